"""`python -m helpers compare A B`: do two runs label the test set alike, and where they differ, which images?

A and B are run folders (of `run` or `predict`) or bare `submission.csv` files (`id_idx,label`). The comparison is
paired, image by image: the share of test images with the same label (with a 95% bootstrap interval), the table of
A's labels against B's, per class how many images each put there that the other did not, the differing images
(listed, and shown in a gallery where the run folder says where the images are), and, where both runs have dev
predictions of the same images, each one's dev accuracy and the paired test of the difference.

Written into the output folder:

| file | what |
|---|---|
| `tables/agreement_table.csv` | A's labels (rows, column `a_class`) against B's (one column per class): image counts |
| `tables/flips.csv` | per class: images in A and in B, `a_not_b` (A put there, B did not), `b_not_a`, `net` (B - A) |
| `tables/differing.csv` | images whose labels differ: `id_idx`, `file`, `label_a`, `class_a`, `label_b`, `class_b` |
| `tables/gallery.csv` | the differing images the gallery shows (at most `GALLERY_MAX`) |
| `tables/dev.csv` | with dev predictions on both sides: each one's dev accuracy and interval, and B - A |
| `figures/agreement_table.png` | the table as a heatmap |
| `figures/changed_images.png` | the gallery: each image with both labels in its title |
| `comparison.json` | what the command's last line prints |
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import random_weight_models
from ..infra.errors import UserError
from ..infra.files import atomic_write_text, read_json_or_none, read_yaml_or_none, slug
from ..research.data import CHALLENGE_CLASSES
from ..research.stats import (
    accuracy_summary,
    confusion_matrix,
    interval_columns,
    label_agreement,
    paired_comparison,
)
from .outputs import SubmissionError, integer_column, read_csv_text, read_submission

GALLERY_MAX = 24  # differing images shown in the gallery
GALLERY_COLUMNS = 6

# what a comparison writes: an earlier comparison's file that this one does not write again is removed, so a
# folder never mixes two comparisons
OUTPUT_FILES = ("tables/agreement_table.csv", "tables/flips.csv", "tables/differing.csv", "tables/gallery.csv",
                "tables/dev.csv", "figures/agreement_table.png", "figures/changed_images.png", "comparison.json")


class CompareError(UserError, ValueError):
    """Two runs that cannot be compared as given; the message names the file and what is wrong."""


@dataclass
class Side:
    """One side of a comparison: a run folder or a bare submission."""

    given: Path  # the path as given
    name: str
    submission: pd.DataFrame  # id_idx, label (ints), in the file's order
    run_dir: Path | None = None  # None: a bare CSV
    files: pd.Series | None = None  # test image file (relative to image_root) by id_idx
    skipped: int = 0  # test images the run left out (their labels are the run's fallback)
    dev: pd.DataFrame | None = None  # file, label, true_label
    classes: list[str] | None = None  # None: not known (a bare CSV)
    classes_source: str = "the challenge's default classes"
    image_root: Path | None = None  # the run's data.test
    random_weights: list[str] = field(default_factory=list)  # the run's models with random weights

    @property
    def kind(self) -> str:
        return "run folder" if self.run_dir is not None else "submission file"


def _submission(path: Path) -> pd.DataFrame:
    ids, labels = read_submission(path)
    return pd.DataFrame({"id_idx": np.asarray(ids, dtype=np.int64), "label": np.asarray(labels, dtype=np.int64)})


def _run_classes(config: dict) -> tuple[list[str] | None, str, Path | None]:
    """The classes of a run (its config's data.classes, else its test folder's classes.json) and its test folder."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    root = Path(data["test"]) if isinstance(data.get("test"), str) else None
    classes = data.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
        return list(classes), "the run's config (data.classes)", root
    if root is not None:
        found = read_json_or_none(root / "classes.json", list)
        if found and all(isinstance(c, str) for c in found):
            return found, f"{root / 'classes.json'}", root
    return None, "the challenge's default classes", root


def _default_name(path: Path) -> str:
    path = Path(path)
    if path.is_file() and path.stem == "submission" and path.resolve().parent.name:
        return path.resolve().parent.name
    return path.stem if path.is_file() else (path.resolve().name or str(path))


def load_side(path: str | Path, name: str | None = None, which: str = "A") -> Side:
    """Read one side: a run folder (its submission.csv, test_predictions.csv, dev_predictions.csv, config.yaml) or
    a bare submission CSV."""
    try:
        return _load_side(Path(path), name, which)
    except SubmissionError as e:  # a file that is no submission (or no run's predictions): these two cannot compare
        raise CompareError(str(e)) from None


def _load_side(path: Path, name: str | None, which: str) -> Side:
    if not path.exists():
        raise CompareError(f"{path}: no such file or folder ({which}); give a run folder or a submission.csv")
    name = name or _default_name(path)
    if path.is_file():
        return Side(path, name, _submission(path))
    submission_file = path / "submission.csv"
    if not submission_file.is_file():
        raise CompareError(f"{path}: no submission.csv in this folder ({which}), so it is not a finished run folder; "
                           "give the folder of a run or predict, or a submission.csv")
    side = Side(path, name, _submission(submission_file), run_dir=path)
    config = read_yaml_or_none(path / "config.yaml", dict) or {}
    classes, source, side.image_root = _run_classes(config)
    side.random_weights = random_weight_models(config.get("models"))
    if classes is not None:
        side.classes, side.classes_source = classes, source
    test_file = path / "test_predictions.csv"
    if test_file.is_file():
        test = read_csv_text(test_file, "the run's test predictions (id_idx,file,label,class)")
        if {"id_idx", "file"} <= set(test.columns):
            ids = integer_column(test["id_idx"], test_file, "id_idx")
            side.files = pd.Series(test["file"].to_numpy(), index=ids).groupby(level=0).first()
            if "skipped" in test.columns:
                side.skipped = int(test["skipped"].str.lower().eq("true").sum())
    dev_file = path / "dev_predictions.csv"
    if dev_file.is_file():
        dev = read_csv_text(dev_file, "the run's dev predictions (file,label,class,true_label)")
        if {"file", "label", "true_label"} <= set(dev.columns):
            side.dev = pd.DataFrame({"file": dev["file"], "label": integer_column(dev["label"], dev_file, "label"),
                                     "true_label": integer_column(dev["true_label"], dev_file, "true_label")})
    return side


def _check_labels(side: Side, n_classes: int) -> None:
    labels = side.submission["label"].to_numpy()
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        where = side.run_dir / "submission.csv" if side.run_dir is not None else side.given
        raise CompareError(f"{where}: label {labels[row]} of id {side.submission['id_idx'].iloc[row]} (line {row + 2}) "
                           f"is outside 0..{n_classes - 1} (the {n_classes} classes); "
                           f"{int(bad.sum())} label(s) are out of range")


def common_classes(a: Side, b: Side) -> tuple[list[str], str]:
    """The classes both sides' labels index: a run's (a bare CSV takes the other side's), else the default."""
    if a.classes is not None and b.classes is not None and a.classes != b.classes:
        raise CompareError(f"{a.given} and {b.given} name different classes ({', '.join(a.classes)} against "
                           f"{', '.join(b.classes)}): their labels cannot be compared")
    for side in (a, b):
        if side.classes is not None:
            return side.classes, side.classes_source
    return list(CHALLENGE_CLASSES), "the challenge's default classes (bare submissions say none)"


def aligned_labels(a: Side, b: Side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both sides' labels on the same ids, in A's order."""
    ids_a, ids_b = set(a.submission["id_idx"]), set(b.submission["id_idx"])
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        parts = [f"{len(s)} only in {side.name}" + (f" (e.g. {s[0]})" if s else "")
                 for s, side in ((only_a, a), (only_b, b)) if s]
        raise CompareError(f"{a.given} and {b.given} are submissions of different test sets: "
                           f"{len(only_a) + len(only_b)} ids differ ({'; '.join(parts)}); compare runs of the same "
                           "images")
    ids = a.submission["id_idx"].to_numpy()
    labels_b = b.submission.set_index("id_idx")["label"].loc[ids].to_numpy()
    return ids, a.submission["label"].to_numpy(), labels_b


def agreement_table(labels_a, labels_b, classes: list[str]) -> pd.DataFrame:
    """Rows: A's class (column `a_class`); columns: B's classes; cells: image counts."""
    matrix = confusion_matrix(labels_a, labels_b, len(classes))
    table = pd.DataFrame(matrix, columns=classes)
    table.insert(0, "a_class", classes)
    return table


def flip_table(labels_a, labels_b, classes: list[str]) -> pd.DataFrame:
    """Per class: the images A put there and B did not, and the reverse."""
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    rows = []
    for i, c in enumerate(classes):
        in_a, in_b = labels_a == i, labels_b == i
        rows.append({"class": c, "label": i, "in_a": int(in_a.sum()), "in_b": int(in_b.sum()),
                     "a_not_b": int((in_a & ~in_b).sum()), "b_not_a": int((in_b & ~in_a).sum()),
                     "net": int(in_b.sum() - in_a.sum())})
    return pd.DataFrame(rows)


def _files_of(a: Side, b: Side) -> tuple[pd.Series | None, Path | None]:
    """Where the test images are: the first side (A, then B) that records files and its image folder."""
    for side in (a, b):
        if side.files is not None:
            return side.files, side.image_root
    return None, None


def compare_dev(a: Side, b: Side) -> tuple[dict | None, str | None]:
    """Each side's dev accuracy and the paired test of B against A, when both have dev predictions of the same
    images (with the same true labels); else None and why not."""
    if a.dev is None or b.dev is None:
        if a.dev is None and b.dev is None:
            return None, None
        missing = [s.name for s in (a, b) if s.dev is None]
        return None, f"no dev comparison: {', '.join(missing)} has no dev predictions"
    files_a, files_b = set(a.dev["file"]), set(b.dev["file"])
    if files_a != files_b or len(a.dev) != len(files_a) or len(b.dev) != len(files_b):
        return None, (f"no dev comparison: the dev sets differ ({len(files_a - files_b)} file(s) only in {a.name}, "
                      f"{len(files_b - files_a)} only in {b.name})")
    if a.dev.empty:
        return None, "no dev comparison: the dev predictions have no rows"
    dev_b = b.dev.set_index("file").loc[a.dev["file"]]
    truth = a.dev["true_label"].to_numpy()
    if not np.array_equal(truth, dev_b["true_label"].to_numpy()):
        return None, "no dev comparison: the two runs give the same dev images different true labels (class maps?)"
    pred_a, pred_b = a.dev["label"].to_numpy(), dev_b["label"].to_numpy()
    result = {"images": int(truth.size), "a": accuracy_summary(truth, pred_a), "b": accuracy_summary(truth, pred_b),
              "b_minus_a": paired_comparison(truth, pred_a, pred_b),
              "agreement": float((pred_a == pred_b).mean()) if truth.size else math.nan}
    return result, None


def changed_gallery(images: list[tuple[Path, str]], columns: int = GALLERY_COLUMNS):
    """One panel per (image file, title), `columns` to a row; the panels beyond the images are left blank."""
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = max(1, math.ceil(len(images) / columns))
    cols = min(columns, max(1, len(images)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, title) in zip(axes.flat, images):
        with Image.open(path) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def _gallery(differing: pd.DataFrame, root: Path | None, a: Side, b: Side, output_dir: Path,
             gallery_max: int) -> tuple[dict | None, str | None]:
    import matplotlib.pyplot as plt

    from ..display.plots import save_figure, save_table

    if differing.empty:
        return None, "no gallery: no image changed its label"
    if a.run_dir is None and b.run_dir is None:
        return None, "no gallery: bare submission CSVs say nothing of where the images are"
    if root is None or differing["file"].eq("").all():
        return None, ("no gallery: the run folder does not say where the test images are (test_predictions.csv "
                      "with its file column, and config.yaml with data.test)")
    shown, missing = [], 0
    for row in differing.itertuples(index=False):
        if len(shown) == gallery_max:
            break
        path = root / row.file
        if not path.is_file():
            missing += 1
            continue
        shown.append((row, path))
    if not shown:
        return None, f"no gallery: none of the differing images is in {root} (moved since the run?)"
    titles = [(p, f"id {r.id_idx}\n{a.name}: {r.class_a}\n{b.name}: {r.class_b}") for r, p in shown]
    fig = changed_gallery(titles)
    random = a.random_weights + b.random_weights
    figure = save_figure(fig, output_dir, "changed_images", random)
    plt.close(fig)
    save_table(pd.DataFrame({"id_idx": [r.id_idx for r, _ in shown], "file": [r.file for r, _ in shown],
                             "path": [str(p) for _, p in shown], "class_a": [r.class_a for r, _ in shown],
                             "class_b": [r.class_b for r, _ in shown]}), output_dir, "gallery", random)
    note = None
    if len(differing) > len(shown):
        note = (f"the gallery shows {len(shown)} of {len(differing)} differing images"
                + (f" ({missing} not found under {root})" if missing else ""))
    return {"figure": str(figure), "images": len(shown)}, note


def parse_names(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise CompareError(f"--names takes two names separated by a comma (NAME_A,NAME_B), got {text!r}")
    return parts[0], parts[1]


def default_output_dir(a: Side, b: Side) -> Path:
    return Path("outputs") / "compare" / f"{slug(a.name, default='run')}-vs-{slug(b.name, default='run')}"


def compare_runs(a: str | Path, b: str | Path, output_dir: str | Path | None = None,
                 names: tuple[str | None, str | None] = (None, None), gallery_max: int = GALLERY_MAX) -> dict:
    """Compare run (or submission) B with A; write the tables and figures; return the result (JSON-ready)."""
    import matplotlib.pyplot as plt

    from ..display.plots import confusion_chart, save_figure, save_table

    side_a, side_b = load_side(a, names[0], "A"), load_side(b, names[1], "B")
    if side_a.name == side_b.name and names == (None, None):  # e.g. two folders named out: say which is which
        side_a.name, side_b.name = f"{side_a.name} (A)", f"{side_b.name} (B)"
    classes, classes_source = common_classes(side_a, side_b)
    for side in (side_a, side_b):
        _check_labels(side, len(classes))
    ids, labels_a, labels_b = aligned_labels(side_a, side_b)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(side_a, side_b)
    if output_dir.exists() and not output_dir.is_dir():
        raise CompareError(f"{output_dir}: a file, not a folder (--output-dir); give a folder")

    random = side_a.random_weights + side_b.random_weights  # named in every table and figure written here
    same = labels_a == labels_b
    agreement = label_agreement(labels_a, labels_b)
    table = agreement_table(labels_a, labels_b, classes)
    flips = flip_table(labels_a, labels_b, classes)
    files, root = _files_of(side_a, side_b)
    differ = ~same
    file_of = files.reindex(ids[differ]).fillna("").to_numpy() if files is not None else [""] * int(differ.sum())
    differing = pd.DataFrame({"id_idx": ids[differ], "file": file_of, "label_a": labels_a[differ],
                              "class_a": [classes[i] for i in labels_a[differ]], "label_b": labels_b[differ],
                              "class_b": [classes[i] for i in labels_b[differ]]})

    for rel in OUTPUT_FILES:  # what an earlier comparison into this folder wrote
        (output_dir / rel).unlink(missing_ok=True)
    written = [save_table(table, output_dir, "agreement_table", random),
               save_table(flips, output_dir, "flips", random), save_table(differing, output_dir, "differing", random)]
    fig = confusion_chart(table[classes].to_numpy(), classes,
                          f"{side_a.name} against {side_b.name}: {int(same.sum())} of {same.size} agree")
    fig.axes[0].set_xlabel(f"B: {side_b.name}")
    fig.axes[0].set_ylabel(f"A: {side_a.name}")
    written.append(save_figure(fig, output_dir, "agreement_table", random))
    plt.close(fig)
    gallery, gallery_note = _gallery(differing, root, side_a, side_b, output_dir, gallery_max)
    dev, dev_note = compare_dev(side_a, side_b)
    if dev is not None:
        rows = [{"run": s.name, **interval_columns("accuracy", dev[key]["accuracy"], dev[key]["ci95"]),
                 "images": dev[key]["images"]} for key, s in (("a", side_a), ("b", side_b))]
        d = dev["b_minus_a"]
        rows.append({"run": "B - A", **interval_columns("accuracy", d["delta"], d["delta_ci95"]),
                     "images": dev["images"], "mcnemar_p": d["mcnemar_p"], "differs": d["differs"]})
        written.append(save_table(pd.DataFrame(rows), output_dir, "dev", random))

    result: dict = {
        "a": str(side_a.given), "b": str(side_b.given), "names": [side_a.name, side_b.name],
        "kinds": [side_a.kind, side_b.kind], "classes": classes, "classes_source": classes_source,
        "images": agreement["images"], "agreement": agreement["agreement"], "agreement_ci95": agreement["ci95"],
        "differing": agreement["differing"],
        "flips": {r["class"]: {"a_not_b": r["a_not_b"], "b_not_a": r["b_not_a"]} for r in flips.to_dict("records")},
        "gallery": gallery, "output_dir": str(output_dir),
    }
    notes = [n for n in (gallery_note, dev_note) if n]
    if random:
        result["random_weights"] = {"a": side_a.random_weights, "b": side_b.random_weights}
        notes.insert(0, "RANDOM weights (" + "; ".join(f"{s.name}: {', '.join(s.random_weights)}" for s in
                                                      (side_a, side_b) if s.random_weights)
                     + "): their labels are meaningless, and so is how well they agree")
    if side_a.skipped or side_b.skipped:
        result["skipped"] = {"a": side_a.skipped, "b": side_b.skipped}
        notes.append(f"skipped images (fallback labels, counted in the agreement): {side_a.name} {side_a.skipped}, "
                     f"{side_b.name} {side_b.skipped}")
    if dev is not None:
        result["dev"] = dev
    result["notes"] = notes
    atomic_write_text(output_dir / "comparison.json", json.dumps(result, indent=2) + "\n")
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_lines(result: dict) -> list[str]:
    """The comparison for a person, a few lines."""
    name_a, name_b = result["names"]
    lo, hi = result["agreement_ci95"]
    lines = [f"A = {name_a} ({result['kinds'][0]} {result['a']})",
             f"B = {name_b} ({result['kinds'][1]} {result['b']})",
             f"test: {result['images']} images, {result['images'] - result['differing']} with the same label: "
             f"agreement {_pct(result['agreement'])} (95% CI {_pct(lo)}-{_pct(hi)}), {result['differing']} differ"]
    moves = [f"{c} {f['a_not_b']}/{f['b_not_a']}" for c, f in result["flips"].items() if f["a_not_b"] or f["b_not_a"]]
    if moves:
        lines.append(f"flips per class (images only {name_a} put there / only {name_b}): {', '.join(moves)}")
    dev = result.get("dev")
    if dev is not None:
        d = dev["b_minus_a"]
        verdict = "a difference beyond chance" if d["differs"] else "no difference beyond chance"
        lines.append(f"dev ({dev['images']} images): {name_a} {_pct(dev['a']['accuracy'])} "
                     f"[{_pct(dev['a']['ci95'][0])}, {_pct(dev['a']['ci95'][1])}], {name_b} "
                     f"{_pct(dev['b']['accuracy'])} [{_pct(dev['b']['ci95'][0])}, {_pct(dev['b']['ci95'][1])}]; "
                     f"B - A {100 * d['delta']:+.1f} points (95% CI {100 * d['delta_ci95'][0]:+.1f} to "
                     f"{100 * d['delta_ci95'][1]:+.1f}), McNemar p={d['mcnemar_p']:.3g}: {verdict}")
    if result["gallery"]:
        lines.append(f"gallery: {result['gallery']['figure']} ({result['gallery']['images']} images)")
    lines += [f"note: {n}" for n in result["notes"]]
    lines.append(f"wrote {result['output_dir']}")
    return lines
