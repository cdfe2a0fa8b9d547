"""`python -m helpers compare A B`: two predict runs (tiny models on real challenge images), copies of them with
labels changed on purpose, bare submission CSVs, the dev paired test, and the one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers.__main__ import main
from helpers.config import config_from_dict
from helpers.research.data import CHALLENGE_CLASSES
from helpers.research.stats import bootstrap_ci, mcnemar_p
from helpers.runs.compare import GALLERY_MAX, changed_gallery
from helpers.runs.pipeline import predict

from .conftest import INTEL_CLASS_MAP, SCENE_IDS

N_IMAGES = len(SCENE_IDS)


def _config(scene_dir, dev_dir, tiny_arch, tiny_checkpoints, cache: Path, sharpness_a: float, weight_a: float):
    a, b = tiny_checkpoints
    model = {"backend": "open_clip", "arch": str(tiny_arch)}
    return config_from_dict({
        "name": "compare",
        "data": {"test": str(scene_dir), "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}},
        "models": {"a": {**model, "pretrained": str(a), "sharpness": sharpness_a},
                   "b": {**model, "pretrained": str(b), "sharpness": 2.0}},
        "ensemble": {"weights": {"a": weight_a, "b": 1 - weight_a}, "drop_below": None},
        "cache_dir": str(cache), "num_workers": 0})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, scene_dir, dev_dir, tiny_arch, tiny_checkpoints) -> dict[str, Path]:
    """Two predict runs of the same images that differ in model a's sharpening and the ensemble weights."""
    tmp = tmp_path_factory.mktemp("compare-runs")
    out = {}
    for name, sharpness, weight in (("A", 2.3, 0.5), ("B", 1.0, 0.8)):
        config = _config(scene_dir, dev_dir, tiny_arch, tiny_checkpoints, tmp / "cache", sharpness, weight)
        predict(config, tmp / name, progress=False)
        out[name] = tmp / name
    return out


def edited_copy(run: Path, dest: Path, changes: dict[int, int], dev_changes: dict[int, int] | None = None) -> Path:
    """A copy of a run folder with the test labels of some ids (and dev labels of some rows) changed, consistently in
    submission.csv and test_predictions.csv."""
    shutil.copytree(run, dest)
    for name in ("submission.csv", "test_predictions.csv"):
        frame = pd.read_csv(dest / name)
        for i, label in changes.items():
            frame.loc[frame["id_idx"] == i, "label"] = label
            if "class" in frame:
                frame.loc[frame["id_idx"] == i, "class"] = CHALLENGE_CLASSES[label]
        frame.to_csv(dest / name, index=False)
    if dev_changes:
        dev = pd.read_csv(dest / "dev_predictions.csv")
        for row, label in dev_changes.items():
            dev.loc[row, ["label", "class"]] = [label, CHALLENGE_CLASSES[label]]
        dev.to_csv(dest / "dev_predictions.csv", index=False)
    return dest


def run_compare(capsys, *args) -> tuple[dict, list[str]]:
    assert main(["compare", *map(str, args)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


def direct(a_csv: Path, b_csv: Path) -> pd.DataFrame:
    """Both submissions' labels joined on id, counted by hand."""
    return pd.read_csv(a_csv).merge(pd.read_csv(b_csv), on="id_idx", suffixes=("_a", "_b"), validate="one_to_one")


def check_tables(out: Path, joined: pd.DataFrame) -> None:
    """The 6x6 table, the flips and the list of differing images against a direct count."""
    table = pd.read_csv(out / "tables" / "agreement_table.csv")
    assert list(table.columns) == ["a_class", *CHALLENGE_CLASSES] and list(table["a_class"]) == CHALLENGE_CLASSES
    matrix = table[CHALLENGE_CLASSES].to_numpy()
    assert matrix.shape == (6, 6) and matrix.sum() == len(joined)
    expected = pd.crosstab(joined["label_a"], joined["label_b"]).reindex(index=range(6), columns=range(6),
                                                                        fill_value=0).to_numpy()
    np.testing.assert_array_equal(matrix, expected)
    flips = pd.read_csv(out / "tables" / "flips.csv")
    for i, row in flips.iterrows():
        in_a, in_b = joined["label_a"] == i, joined["label_b"] == i
        assert (row["in_a"], row["in_b"]) == (in_a.sum(), in_b.sum())
        assert row["a_not_b"] == (in_a & ~in_b).sum() and row["b_not_a"] == (in_b & ~in_a).sum()
    differing = pd.read_csv(out / "tables" / "differing.csv")
    changed = joined[joined["label_a"] != joined["label_b"]]
    assert list(differing["id_idx"]) == list(changed["id_idx"])
    assert list(differing["label_a"]) == list(changed["label_a"])
    assert list(differing["label_b"]) == list(changed["label_b"])


def test_two_predict_runs_agree_as_a_direct_count_says(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    result, summary = run_compare(capsys, runs["A"], runs["B"], "--output-dir", out)
    joined = direct(runs["A"] / "submission.csv", runs["B"] / "submission.csv")
    same = (joined["label_a"] == joined["label_b"]).to_numpy()
    assert result["images"] == N_IMAGES == len(joined)
    assert result["agreement"] == pytest.approx(same.mean())
    assert result["differing"] == int((~same).sum())
    assert result["agreement_ci95"] == pytest.approx(list(bootstrap_ci(same.astype(float))))
    assert result["names"] == ["A", "B"] and result["classes"] == CHALLENGE_CLASSES
    check_tables(out, joined)
    assert (out / "figures" / "agreement_table.png").stat().st_size > 0
    assert json.loads((out / "comparison.json").read_text()) == result
    assert "dev" in result  # both runs have the same dev images
    assert any(line.startswith("test: 38 images") for line in summary) and summary[-1] == f"wrote {out}"


def test_changed_labels_give_flips_tables_and_a_capped_gallery(runs, tmp_path, capsys):
    ids = pd.read_csv(runs["A"] / "submission.csv")
    original = dict(zip(ids["id_idx"], ids["label"]))
    changes = {i: (original[i] + 1 + k % 5) % 6 for k, i in enumerate(list(original)[:30])}  # 30 differ, every class
    edited = edited_copy(runs["A"], tmp_path / "edited", changes)
    out = tmp_path / "cmp"
    result, summary = run_compare(capsys, runs["A"], edited, "--output-dir", out, "--names", "base,edited")
    joined = direct(runs["A"] / "submission.csv", edited / "submission.csv")
    assert result["differing"] == 30 and result["agreement"] == pytest.approx((N_IMAGES - 30) / N_IMAGES)
    assert result["names"] == ["base", "edited"]
    check_tables(out, joined)
    for c, f in result["flips"].items():
        i = CHALLENGE_CLASSES.index(c)
        assert f["a_not_b"] == sum(original[k] == i for k in changes)
        assert f["b_not_a"] == sum(v == i for v in changes.values())
    differing = pd.read_csv(out / "tables" / "differing.csv")
    assert list(differing.columns) == ["id_idx", "file", "label_a", "class_a", "label_b", "class_b"]
    assert list(differing["file"]) == [f"0/{i}.jpg" for i in differing["id_idx"]]
    # the gallery: the first GALLERY_MAX differing images, found under the run's data.test
    gallery = pd.read_csv(out / "tables" / "gallery.csv")
    assert result["gallery"]["images"] == len(gallery) == GALLERY_MAX < 30
    assert list(gallery["id_idx"]) == list(differing["id_idx"][:GALLERY_MAX])
    assert all(Path(p).is_file() for p in gallery["path"])
    assert (out / "figures" / "changed_images.png").stat().st_size > 0
    assert any(f"shows {GALLERY_MAX} of 30" in n for n in result["notes"])
    assert any("flips per class" in line for line in summary)


def test_a_gallery_has_one_panel_per_changed_image(runs, tmp_path, capsys, scene_dir):
    original = pd.read_csv(runs["A"] / "submission.csv").set_index("id_idx")["label"]
    changes = {i: (int(original[i]) + 2) % 6 for i in (3, 17, 148)}
    edited = edited_copy(runs["A"], tmp_path / "edited", changes)
    out = tmp_path / "cmp"
    result, _ = run_compare(capsys, runs["A"], edited, "--output-dir", out)
    gallery = pd.read_csv(out / "tables" / "gallery.csv")
    assert result["gallery"]["images"] == 3 and sorted(gallery["id_idx"]) == [3, 17, 148]
    assert list(gallery["class_b"]) == [CHALLENGE_CLASSES[changes[i]] for i in gallery["id_idx"]]
    images = [(scene_dir / "0" / f"{i}.jpg", f"id {i}") for i in gallery["id_idx"]]
    for n in (1, 3, 7):
        fig = changed_gallery(images[:1] * n)
        assert sum(1 for ax in fig.axes if ax.images) == n
        assert [ax.get_title() for ax in fig.axes if ax.images] == ["id 3"] * n
        plt.close(fig)
    # the same folder again, now with runs that agree: the earlier gallery does not stay behind
    result, _ = run_compare(capsys, runs["A"], runs["A"], "--output-dir", out)
    assert result["differing"] == 0 and result["gallery"] is None
    assert not (out / "figures" / "changed_images.png").exists() and not (out / "tables" / "gallery.csv").exists()
    assert result["agreement"] == 1.0 and result["names"] == ["A (A)", "A (B)"]


def test_bare_submission_csvs(runs, tmp_path, capsys, monkeypatch):
    original = pd.read_csv(runs["A"] / "submission.csv")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    shutil.copy(runs["A"] / "submission.csv", tmp_path / "one" / "submission.csv")
    changed = original.assign(label=np.where(original["id_idx"] % 4 == 0, (original["label"] + 1) % 6,
                                             original["label"]))
    changed.sample(frac=1, random_state=0).to_csv(tmp_path / "two" / "submission.csv", index=False)  # other order
    monkeypatch.chdir(tmp_path)
    result, summary = run_compare(capsys, "one/submission.csv", "two/submission.csv")
    out = tmp_path / "outputs" / "compare" / "one-vs-two"  # the default: named by the folders
    assert result["output_dir"] == "outputs/compare/one-vs-two" and result["names"] == ["one", "two"]
    assert result["kinds"] == ["submission file", "submission file"] and result["classes"] == CHALLENGE_CLASSES
    joined = direct(tmp_path / "one" / "submission.csv", tmp_path / "two" / "submission.csv")
    assert result["differing"] == int((original["id_idx"] % 4 == 0).sum()) > 0
    assert result["agreement"] == pytest.approx((joined["label_a"] == joined["label_b"]).mean())
    check_tables(out, joined)
    assert (pd.read_csv(out / "tables" / "differing.csv")["file"].isna()).all()  # bare CSVs name no files
    assert result["gallery"] is None and not (out / "figures" / "changed_images.png").exists()
    assert any("bare submission CSVs" in n for n in result["notes"])
    assert any("no gallery" in line for line in summary)
    assert "dev" not in result
    # a bare CSV against a run folder: the run's images give the gallery, the run's classes are used
    result, _ = run_compare(capsys, "two/submission.csv", runs["A"], "--output-dir", "mixed")
    assert result["gallery"]["images"] == result["differing"] and "dev" not in result
    assert any("no dev comparison" in n for n in result["notes"])


def test_dev_accuracy_and_paired_test_when_both_have_dev(runs, tmp_path, capsys):
    dev = pd.read_csv(runs["A"] / "dev_predictions.csv")
    # B gets the true label on 10 dev images where A is wrong, and a wrong one on 1 where A is right
    wrong = list(dev.index[dev["label"] != dev["true_label"]][:10])
    right = list(dev.index[dev["label"] == dev["true_label"]][:1])
    fixes = {r: int(dev.loc[r, "true_label"]) for r in wrong} | {r: (int(dev.loc[r, "label"]) + 1) % 6 for r in right}
    edited = edited_copy(runs["A"], tmp_path / "better", {}, fixes)
    result, summary = run_compare(capsys, runs["A"], edited, "--output-dir", tmp_path / "cmp")
    b = pd.read_csv(edited / "dev_predictions.csv")
    correct_a = (dev["label"] == dev["true_label"]).to_numpy()
    correct_b = (b["label"] == b["true_label"]).to_numpy()
    d = result["dev"]
    assert d["images"] == len(dev)
    assert d["a"]["accuracy"] == pytest.approx(correct_a.mean())
    assert d["b"]["accuracy"] == pytest.approx(correct_b.mean())
    assert d["b_minus_a"]["delta"] == pytest.approx(correct_b.mean() - correct_a.mean())
    assert d["b_minus_a"]["mcnemar_p"] == pytest.approx(mcnemar_p(correct_a, correct_b))
    lo, hi = d["b_minus_a"]["delta_ci95"]
    assert lo <= d["b_minus_a"]["delta"] <= hi
    table = pd.read_csv(tmp_path / "cmp" / "tables" / "dev.csv")
    assert list(table["run"]) == ["A", "better", "B - A"]
    assert table["accuracy"].iloc[2] == pytest.approx(d["b_minus_a"]["delta"])
    assert any(line.startswith("dev (") and "McNemar" in line for line in summary)
    assert result["differing"] == 0  # only dev labels changed

    # dev sets of other images: no paired test, said so
    other = tmp_path / "other-dev"
    shutil.copytree(edited, other)
    pd.read_csv(edited / "dev_predictions.csv").iloc[:-2].to_csv(other / "dev_predictions.csv", index=False)
    result, _ = run_compare(capsys, runs["A"], other, "--output-dir", tmp_path / "cmp2")
    assert "dev" not in result and any("the dev sets differ" in n for n in result["notes"])


def _bad(tmp_path: Path, runs: dict[str, Path], case: str) -> tuple[list[str], str]:
    good = runs["A"] / "submission.csv"
    path = tmp_path / f"{case}.csv"
    if case == "missing":
        return [str(tmp_path / "nowhere"), str(good)], "nowhere: no such file or folder (A)"
    if case == "folder without submission":
        (tmp_path / "empty-run").mkdir()
        return [str(good), str(tmp_path / "empty-run")], "no submission.csv in this folder (B)"
    if case == "header":
        path.write_text("id,prediction\n0,1\n")
        return [str(path), str(good)], "the header must be id_idx,label"
    if case == "other ids":
        frame = pd.read_csv(good)
        shifted = frame["id_idx"].where(frame["id_idx"] < 30, frame["id_idx"] + 1000)
        frame.assign(id_idx=shifted).to_csv(path, index=False)
        n = 2 * int((frame["id_idx"] >= 30).sum())
        return [str(good), str(path)], f"submissions of different test sets: {n} ids differ"
    if case == "label 6":
        frame = pd.read_csv(good)
        frame.loc[5, "label"] = 6
        frame.to_csv(path, index=False)
        return [str(good), str(path)], "label 6 of id 5 (line 7) is outside 0..5"
    if case == "negative label":
        frame = pd.read_csv(good)
        frame.loc[0, "label"] = -1
        frame.to_csv(path, index=False)
        return [str(path), str(good)], "label -1 of id 0 (line 2) is outside 0..5"
    if case == "not an integer":
        path.write_text("id_idx,label\n0,1\n1,Sea\n")
        return [str(path), str(good)], "label 'Sea' on line 3 is not an integer"
    if case == "duplicate id":
        path.write_text("id_idx,label\n0,1\n1,2\n0,3\n")
        return [str(path), str(good)], "id 0 appears more than once (lines 2, 4)"
    if case == "empty":
        path.write_text("")
        return [str(path), str(good)], "the file is empty"
    if case == "names":
        return [str(good), str(good), "--names", "only-one"], "--names takes two names separated by a comma"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "folder without submission", "header", "other ids", "label 6",
                                  "negative label", "not an integer", "duplicate id", "empty", "names"])
def test_errors_are_one_line(runs, tmp_path, capsys, case):
    args, expected = _bad(tmp_path, runs, case)
    assert main(["compare", *args, "--output-dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_random_weights_are_said_in_the_output_tables_and_figures(runs, tmp_path, capsys):
    random = shutil.copytree(runs["B"], tmp_path / "random")
    config = yaml.safe_load((random / "config.yaml").read_text())
    config["models"]["b"]["pretrained"] = "random"  # as a run with random weights records it
    (random / "config.yaml").write_text(yaml.safe_dump(config))
    result, lines = run_compare(capsys, runs["A"], random, "--output-dir", tmp_path / "out")
    assert result["random_weights"] == {"a": [], "b": ["b"]}
    assert "note: RANDOM weights (random: b): their labels are meaningless, and so is how well they agree" in lines
    for table in ("agreement_table", "flips", "differing"):
        assert set(pd.read_csv(tmp_path / "out" / "tables" / f"{table}.csv")["random_weights"]) == {"b"}, table
