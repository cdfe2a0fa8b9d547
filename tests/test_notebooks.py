"""The notebooks, executed end to end by papermill on tiny models and real images: what each writes."""

import json
import os
import platform
import re
import sys

import nbformat
import pytest
import yaml
from PIL import Image

from helpers.config import load_config
from helpers.infra.jupyter import KERNEL_NAME, ensure_kernel, install_lab_settings
from helpers.infra.progress import OUTPUT_WIDTH
from helpers.research.data import DataError
from helpers.runs.notebooks import (
    INFERENCE,
    NOTEBOOKS,
    SHARPNESS,
    RunError,
    execute,
    run_pipeline,
    run_summary,
)
from helpers.runs.outputs import read_submission
from helpers.runs.pipeline import predict

from .conftest import INTEL_CLASS_MAP, PROJECT_ROOT, SCENE_IDS

NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs_and_a_parameters_cell(path):
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert book.metadata.kernelspec.name == KERNEL_NAME


def test_there_are_the_five_notebooks():
    assert [p.name for p in NOTEBOOK_FILES] == ["01_inspect.ipynb", "02_preprocessing_ablation.ipynb",
                                                 "03_prompt_ablation.ipynb", "04_inference.ipynb", "05_ensemble.ipynb"]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, scene_dir, dev_dir, tiny_arch, tiny_checkpoints):
    folder = tmp_path_factory.mktemp("run-config")
    a, b = tiny_checkpoints
    raw = {
        "name": "nbtest",
        "data": {"test": str(scene_dir), "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}},
        # fp32 named: the notebooks' kernels resolve `auto` for their machine, and the tests compare with fp32 runs
        "models": {"a": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(a), "sharpness": 2.3,
                         "precision": "fp32"},
                   # a restoration step, its sigma the test set's estimated blur (README, "Restoring the blur")
                   "b": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(b),
                         "preprocess": [{"wiener": {"sigma": "auto"}}], "precision": "fp32"}},
        "ensemble": {"weights": {"a": 0.5, "b": 0.5}, "drop_below": 0.002},
        "cache_dir": str(folder / "cache"),
        "num_workers": 0,
        "analysis": {"inspect_images": 3, "sharpness_grid": [1.0, 2.3, [2.0, 2.5]], "weight_grid": [0.4, 0.5, 0.6],
                     "restoration_grid": [{"wiener": {"sigma": "auto"}}, {"richardson_lucy": {"iterations": 3}},
                                          {"unsharp_mask": {"radius": 3.0, "amount": 2.0}}],
                     "drop_thresholds": [0.001, 0.002]},
        # the transductive stage on each model, then combined: the submission is its labels (run and predict alike)
        "transductive": {"method": "label_propagation", "applies_to": "each_model", "params": {"k": 5}},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def run_dir(run_config, tmp_path_factory):
    """The run, its analyses added to a store beside it (`analyses/`)."""
    logs = []
    folder = tmp_path_factory.mktemp("run")
    out = run_pipeline(load_config(run_config), output_dir=folder / "r", progress=False, log=logs.append,
                       shared_analyses=folder / "analyses")
    assert logs[:2] == ["model a: running 04_inference.ipynb", "model b: running 04_inference.ipynb"]
    return out


EXECUTED = ["04_inference-a.ipynb", "04_inference-b.ipynb", "05_ensemble.ipynb", "01_inspect.ipynb",
            "02_preprocessing_ablation.ipynb", "03_prompt_ablation-a.ipynb", "03_prompt_ablation-b.ipynb"]
FIGURES = ["sharpening_gallery", "restoration_gallery", "blur_histograms", "sharpness_ablation",
           "preprocessing_ablation", "prompt_groups-a", "scoring_modes-b",
           "predicted_classes-a", "predicted_classes-ensemble", "dev_confusion-ensemble", "ensemble_weights",
           "drop_threshold", "transductive"]


def test_run_writes_the_submission_and_the_executed_notebooks(run_dir):
    ids, labels = read_submission(run_dir / "submission.csv")
    assert ids == SCENE_IDS and set(labels) <= set(range(6))
    assert json.loads((run_dir / "manifest.json").read_text())["models"]["a"]["random_weights"] is False
    assert json.loads((run_dir / "metrics.json").read_text())["dev"]["images"] == 24
    for name in EXECUTED:
        book = nbformat.read(run_dir / "notebooks" / name, as_version=4)
        outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
        assert outputs and not [o for o in outputs if o.output_type == "error"], name
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in book.cells)
    shown = [o for c in nbformat.read(run_dir / "notebooks" / "05_ensemble.ipynb", as_version=4).cells
             if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= 3  # the figures are in the executed notebook, not only on disk


def test_figures_are_saved_as_png(run_dir):
    for name in FIGURES:
        with Image.open(run_dir / "figures" / f"{name}.png") as img:
            assert img.format == "PNG" and min(img.size) > 100, name


def test_tables_carry_intervals(run_dir):
    import pandas as pd

    sharp = pd.read_csv(run_dir / "tables" / "sharpness_ablation.csv", dtype={"variant": str})
    assert sharp["variant"].tolist() == ["1", "2.3", "2+2.5"] * 2
    groups = pd.read_csv(run_dir / "tables" / "prompt_groups-a.csv")
    assert len(groups) == 11 and groups["reference"].sum() == 1
    for name in ["sharpness_ablation", "prompt_groups-a", "scoring_modes-a", "ensemble_weights", "drop_threshold",
                 "dev_accuracy", "transductive"]:
        table = pd.read_csv(run_dir / "tables" / f"{name}.csv")
        assert {"accuracy", "accuracy_ci_low", "accuracy_ci_high"} <= set(table.columns), name
        assert (table["accuracy_ci_low"] <= table["accuracy"]).all(), name
        assert (table["accuracy"] <= table["accuracy_ci_high"]).all(), name
    # restorations beside the sharpening factors, each model against its configured preprocessing (b's: Wiener)
    ablation = pd.read_csv(run_dir / "tables" / "preprocessing_ablation.csv")
    sigma = json.loads((run_dir / "manifest.json").read_text())["auto_blur"]["sigma_px"]
    wiener = f"wiener sigma={sigma} edges=mirror balance=0.1"
    assert ablation[ablation["reference"]][["model", "variant", "kind"]].values.tolist() == [
        ["a", "sharpness 2.3", "configured"], ["b", wiener, "configured"]]
    assert ablation.groupby(["model", "kind"]).size().to_dict() == {
        ("a", "configured"): 1, ("a", "restoration"): 3, ("a", "sharpening"): 2,  # sharpness 2.3 is a's configured
        ("b", "configured"): 1, ("b", "restoration"): 2, ("b", "sharpening"): 3}  # and the Wiener b's
    blur = pd.read_csv(run_dir / "tables" / "blur_statistics.csv").set_index("split")
    assert 5.5 < blur.loc["test", "median"] < 7.2 and blur.loc["dev", "median"] < 1  # the dev photos are sharp


def test_the_transductive_stage_runs_in_the_notebooks_and_05_ablates_every_method(run_dir):
    import pandas as pd

    from helpers.research.transductive import METHODS

    stage = json.loads((run_dir / "metrics.json").read_text())["transductive"]
    assert (stage["method"], stage["applies_to"], stage["params"]["k"]) == ("label_propagation", "each_model", 5)
    assert set(stage["test"]["models"]) == {"a", "b"} and sum(stage["test"]["predicted_counts_after"].values()) == 38
    assert stage["dev"]["zero_shot"]["images"] == 24
    table = pd.read_csv(run_dir / "tables" / "transductive.csv")
    assert table["scope"].unique().tolist() == ["model a", "model b", "ensemble"]
    assert table["variant"].tolist() == ["zero-shot", *METHODS.names()] * 3
    assert table["reference"].sum() == 3 and (table["p_holm"] >= table["p_value"]).all()


ANALYSES = ["01_inspect.ipynb", "02_preprocessing_ablation.ipynb", "03_prompt_ablation-a.ipynb",
            "03_prompt_ablation-b.ipynb"]


def test_which_analyses_a_setting_changes(run_config):
    """An analysis notebook's outputs are another run's where what it reads of the config is the same."""
    from helpers.config import json_digest
    from helpers.runs.analyses import analysis_notebooks, reads

    def keys(*overrides):
        config = load_config(run_config, list(overrides))
        return {a.executed_name: json_digest(reads(config, a)) for a in analysis_notebooks(config)}

    base = keys()

    def changed(*overrides):
        return [name for name, key in keys(*overrides).items() if base[name] != key]

    assert list(base) == ANALYSES
    assert changed("ensemble.weights.a=0.7", "ensemble.weights.b=0.3", "ensemble.drop_below=null", "name=other",
                   "cache_dir=/elsewhere", "num_workers=2", "reference=winner-116", "analysis.weight_grid=[0.5]",
                   "transductive=null") == []
    assert changed("models.a.sharpness=1.0") == ANALYSES[1:3]  # 02 (every model) and a's 03
    assert changed("models.b.preprocess=[{wiener: {sigma: 5.0}}]") == ANALYSES[1:2] + ANALYSES[3:]  # and b's
    assert changed("prompts={set: winner, exclude: [descriptions]}") == ANALYSES[1:]  # the dev-set ablations
    assert changed("analysis.inspect_images=2") == ANALYSES[:1]
    assert changed("analysis.restoration_grid=[]") == ANALYSES[:2]  # 01 and 02 show the restorations, 03 does not
    assert changed("data.limit=8") == ANALYSES
    assert changed("models.b.pretrained=random") == ANALYSES  # the figures name the models with random weights


def test_an_analysis_key_holds_the_text_of_the_prompts_it_scores_with(run_config, tmp_path):
    """The config names a prompt-set file by its path: a file rewritten since is other inputs for the notebooks that
    score (02 and 03), not for 01."""
    from helpers.runs.analyses import analysis_key, analysis_notebooks
    from helpers.runs.pipeline import load_run_data

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"name": "p", "groups": {"plain": ["a photo of a {c}"]}}))
    config = load_config(run_config, [f"prompts={{set: {prompts}}}"])

    def keys():
        data = load_run_data(config)
        return {a.executed_name: analysis_key(config, a, data) for a in analysis_notebooks(config)}

    before = keys()
    prompts.write_text(yaml.safe_dump({"name": "p", "groups": {"plain": ["a blurry photo of a {c}"]}}))
    after = keys()
    assert [name for name in before if before[name] != after[name]] == ANALYSES[1:]


def test_a_run_with_the_same_inputs_copies_the_analyses_instead_of_running_them(run_dir, run_config, tmp_path):
    """Another ensemble weighting: every analysis notebook is copied from the store the first run added to (no
    kernel started), its figures and tables byte for byte, the notebook's paths made the run's own."""
    from helpers.runs.notebooks import run_analyses
    from helpers.runs.pipeline import prepare_run

    config = load_config(run_config, ["ensemble.weights.a=0.7", "ensemble.weights.b=0.3"])
    other = tmp_path / "other"
    data = prepare_run(config, other, progress=False)
    logs = []
    run_analyses(config, other, data, "no-kernel", False, logs.append, run_dir.parent / "analyses")
    assert logs == [f"{name}: copied from {run_dir.resolve()} (the same inputs)" for name in ANALYSES]
    copied = [p for folder in ("figures", "tables") for p in sorted((other / folder).iterdir())]
    assert {p.stem for p in copied} >= {"sharpening_gallery", "blur_statistics", "sharpness_ablation",
                                        "prompt_groups-a", "scoring_modes-b"}
    for path in copied:
        assert path.read_bytes() == (run_dir / path.parent.name / path.name).read_bytes(), path.name
    for name in ANALYSES:
        book = nbformat.read(other / "notebooks" / name, as_version=4)
        at = next(i for i, c in enumerate(book.cells) if "injected-parameters" in c.metadata.get("tags", []))
        assert f'output_dir = "{other.resolve()}"' in book.cells[at].source
        assert str(run_dir.resolve()) not in json.dumps(book.cells[at].source), name
        assert book.cells[at + 1].cell_type == "markdown" and str(run_dir.resolve()) in book.cells[at + 1].source
        original = nbformat.read(run_dir / "notebooks" / name, as_version=4)
        assert len(book.cells) == len(original.cells) + 1  # the note the only cell added


def test_run_and_predict_give_byte_identical_submissions(run_dir, run_config, tmp_path):

    predict(load_config(run_config), tmp_path / "predict", progress=False)
    assert (tmp_path / "predict" / "submission.csv").read_bytes() == (run_dir / "submission.csv").read_bytes()


def test_a_rerun_reuses_finished_inference(run_dir, run_config):
    before = {n: (run_dir / "notebooks" / n).stat().st_mtime_ns for n in EXECUTED[:2]}
    logs = []
    run_pipeline(load_config(run_config), output_dir=run_dir, analyses=False, progress=False, log=logs.append)
    assert logs[:2] == [f"model {n}: reusing the finished inference in {run_dir}/notebooks/04_inference-{n}.ipynb"
                        for n in "ab"]
    assert {n: (run_dir / "notebooks" / n).stat().st_mtime_ns for n in EXECUTED[:2]} == before


def test_a_rerun_runs_again_an_inference_notebook_that_failed(run_dir, run_config):
    """papermill writes the executed notebook also when a cell fails: such a notebook is not a finished model."""
    import nbformat

    path = run_dir / "notebooks" / "04_inference-b.ipynb"
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[-1].metadata.papermill["status"] = "failed"
    nbformat.write(notebook, path)
    logs = []
    run_pipeline(load_config(run_config), output_dir=run_dir, analyses=False, progress=False, log=logs.append)
    assert logs[:2] == [f"model a: reusing the finished inference in {run_dir}/notebooks/04_inference-a.ipynb",
                        "model b: running 04_inference.ipynb"]
    assert nbformat.read(path, as_version=4).cells[-1].metadata.papermill["status"] == "completed"


def test_a_run_folder_of_another_config_is_refused(run_dir, run_config):
    with pytest.raises(RunError, match="holds a run of another config"):
        run_pipeline(load_config(run_config, ["ensemble.drop_below=null"]), output_dir=run_dir, progress=False,
                     log=print)


def test_an_unusable_image_stops_the_run_before_any_notebook(run_config, dev_dir, tmp_path):
    broken = tmp_path / "dev"
    for folder in INTEL_CLASS_MAP:
        (broken / folder).mkdir(parents=True)
        for p in sorted((dev_dir / folder).iterdir())[:1]:
            (broken / folder / p.name).write_bytes(p.read_bytes())
    (broken / "sea" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"1 of 45 images cannot be used, so nothing was encoded: .*broken\.jpg"):
        run_pipeline(load_config(run_config, [f"data.dev.path={broken}"]), output_dir=tmp_path / "run",
                     progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_a_failing_cell_shows_the_one_line_error_and_the_run_names_notebook_and_cell(run_config, tmp_path):
    config = tmp_path / "gone.yaml"  # the error a notebook meets at its start-up
    out = tmp_path / "04_inference-a.ipynb"
    with pytest.raises(RunError) as e:
        execute(INFERENCE, out, {"config_path": str(config), "output_dir": str(tmp_path), "model_name": "a"},
                ensure_kernel(), progress=False)
    message = str(e.value)
    assert message.startswith(f"04_inference.ipynb failed in cell In [3] (`import pandas as pd`): {config}: no such "
                              "run config file (the executed notebook, with the cell's output, is ")
    assert "\n" not in message and "Traceback" not in message
    failed = next(c for c in nbformat.read(out, as_version=4).cells if c.get("outputs"))
    assert [o.get("traceback") for o in failed.outputs if o.output_type == "error"] == [
        [f"error: {config}: no such run config file"]]


def _outputs_text(book) -> list[str]:
    """Every text a saved notebook shows: streams, and the text/plain of displays and results."""
    texts = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            texts.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
    return texts


def test_a_saved_run_shows_pictures_for_widgets_and_finished_progress(run_dir):
    """JupyterLab draws no widget of a notebook it did not save: a saved run shows a picture or text in each widget's
    place, and progress as finished text bars (a saved widget bar reads `0%| | 0/64` forever)."""
    inspect = nbformat.read(run_dir / "notebooks" / "01_inspect.ipynb", as_version=4)
    slider = next(c for c in inspect.cells if "sharpness_slider(" in c.source)
    assert [o for o in slider.outputs if "image/png" in o.get("data", {})]
    hint = (f"run the source notebook live: `make lab` in {PROJECT_ROOT} opens notebooks/; open 01_inspect.ipynb "
            f'there and set config_path = "{run_dir.resolve()}/config.yaml" in its parameters cell')
    assert hint in " ".join("".join(_outputs_text(inspect)).split())  # which notebook, how, with which config
    prompts = nbformat.read(run_dir / "notebooks" / "03_prompt_ablation-a.ipynb", as_version=4)
    boxes = next(c for c in prompts.cells if "prompt_group_checkboxes(" in c.source)
    assert "a, every prompt group" in "".join(o.get("text", "") for o in boxes.outputs)  # which model
    for name in EXECUTED:
        book = nbformat.read(run_dir / "notebooks" / name, as_version=4)
        outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], name
        text = "\n".join(_outputs_text(book))
        assert not re.search(r"(?<!\d)0%\|", text) and "VBox(" not in text, name
    encodes = "\n".join(_outputs_text(nbformat.read(run_dir / "notebooks" / "04_inference-a.ipynb", as_version=4)))
    assert re.search(r"encode a \(sharpness 2\.3\): 100%\|\S+\| 38/38 ", encodes)  # the test images' encode, done


def test_a_saved_notebook_run_live_writes_beside_its_run_not_into_it(run_dir, tmp_path):
    """A saved copy opened in JupyterLab and run (papermill here, without the saved-run environment of
    `python -m helpers run`) has the run folder as its output_dir: it writes beside it, and the run stays as it was."""
    import papermill as pm

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    pm.execute_notebook(run_dir / "notebooks" / "05_ensemble.ipynb", tmp_path / "live.ipynb",
                        kernel_name=ensure_kernel(), progress_bar=False, cwd=str(PROJECT_ROOT))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    live = run_dir.parent / f"{run_dir.name}-live"
    assert (live / "submission.csv").read_bytes() == (run_dir / "submission.csv").read_bytes()
    assert f"{run_dir} is a saved run" in "".join(_outputs_text(nbformat.read(tmp_path / "live.ipynb", as_version=4)))


def test_saved_notebooks_fit_the_window_and_leave_nothing_undefined_unexplained(run_dir):
    """What a researcher reads in JupyterLab: printed lines wrapped at words to the output's width (a browser breaks
    longer ones mid-word), tables without NaN or "..." (undefined numbers are "—", with a sentence saying why),
    no error-coloured stream."""
    for name in EXECUTED:
        book = nbformat.read(run_dir / "notebooks" / name, as_version=4)
        outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], name
        for line in "".join(o["text"] for o in outputs if o.output_type == "stream").splitlines():
            assert len(line) <= OUTPUT_WIDTH or max(map(len, line.split())) > 40, (name, line)  # a path: whole
        tables = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
        assert "NaN" not in tables and "..." not in tables, name
    ensemble = "".join(_outputs_text(nbformat.read(run_dir / "notebooks" / "05_ensemble.ipynb", as_version=4)))
    assert "the ensemble's own row has neither (—)" in " ".join(ensemble.split())


def test_the_end_of_run_summary_says_where_what_and_how_to_look(run_dir):
    summary = run_summary(run_dir)
    lines = summary.splitlines()
    assert lines[0].startswith(f"wrote {run_dir}: submission.csv, metrics.json, manifest.json")
    flat = " ".join(summary.split())
    for name in FIGURES:
        assert f"{name}.png" in flat, name
    assert "executed notebooks, notebooks/ (7): 01_inspect.ipynb" in flat
    assert f"{os.path.relpath(sys.executable)} -m helpers compare {run_dir} OTHER_RUN" in summary  # the venv's python
    assert f"make lab RUN={run_dir.resolve()}" in summary  # outside the project: the absolute path


# what JupyterLab 4.6 writes into a notebook's metadata when it opens one with the project's kernel (the kernel's
# language_info; the kernelspec was there): without it, a source notebook opens marked as changed before anything ran
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3"}


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_source_notebooks_carry_the_metadata_jupyterlab_fills_in(path):
    book = nbformat.read(path, as_version=4)
    info = dict(book.metadata.language_info)
    # the patch release is the development machine's (3.11.7): another one marks the notebook changed, nothing more
    assert info.pop("version").split(".")[:2] == platform.python_version().split(".")[:2]
    assert book.metadata == {"kernelspec": {"display_name": "Python (blur-zeroshot workbench)", "language": "python",
                                            "name": KERNEL_NAME}, "language_info": book.metadata.language_info}
    assert info == LANGUAGE_INFO
    assert (book.nbformat, book.nbformat_minor) == (4, 5) and all(c.get("id") for c in book.cells)
    assert path.read_text() == nbformat.writes(book) + "\n"  # as Jupyter writes it: no reformatting on save


def test_the_dev_set_advice_works_when_followed(run_config, tmp_path):
    """Without data.dev, a dev-set notebook runs, says what it skips, what to build and how to name it in the
    config."""
    config = yaml.safe_load(run_config.read_text())
    dev = config["data"].pop("dev")
    no_dev = tmp_path / "no-dev.yaml"
    no_dev.write_text(yaml.safe_dump(config))
    execute(SHARPNESS, tmp_path / "02.ipynb", {"config_path": str(no_dev), "output_dir": str(tmp_path)},
            ensure_kernel(), progress=False)
    message = " ".join("".join(_outputs_text(nbformat.read(tmp_path / "02.ipynb", as_version=4))).split())
    assert "No dev set in this config (data.dev): the sharpness ablation is skipped" in message
    assert "--set data.dev.path=data/dev" in message and "`dev: {path: data/dev}`" in message
    assert not (tmp_path / "tables").exists()
    config["data"]["dev"] = {"path": dev["path"], "class_map": dev["class_map"]}  # the advice: name it, then rerun
    no_dev.write_text(yaml.safe_dump(config))
    execute(SHARPNESS, tmp_path / "02.ipynb", {"config_path": str(no_dev), "output_dir": str(tmp_path)},
            ensure_kernel(), progress=False)
    assert (tmp_path / "tables" / "sharpness_ablation.csv").is_file()


def test_install_lab_settings_turns_the_news_off_and_keeps_other_settings(tmp_path):
    path = tmp_path / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
                                "@jupyterlab/apputils-extension:notification": {"checkForUpdates": False}}))
    assert install_lab_settings(tmp_path) == path
    assert json.loads(path.read_text()) == {
        "@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
        "@jupyterlab/apputils-extension:notification": {"checkForUpdates": False, "fetchNews": "false"}}


def test_a_notebook_names_random_weights_in_what_it_saves_without_module_state(make_config, tmp_path, monkeypatch):
    """nb.start's folder carries the run's random-weight models to every figure and table saved through it; nothing
    is left set in another module (a second notebook in the same process starts from its own config)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from helpers.display import nb, plots

    monkeypatch.chdir(tmp_path)  # nb.start works from the project root: put back after the test
    random_model = {"backend": "open_clip", "arch": "ViT-B-32-quickgelu", "pretrained": "random"}
    config = make_config(data={"test": make_config().data.test, "limit": 4}, models={"r": random_model},
                         ensemble={})
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    _, _, folder = nb.start(str(path), str(tmp_path / "out"))
    assert folder.random_weights == ("r",) and os.fspath(folder) == str(tmp_path / "out") and folder / "x" == \
        tmp_path / "out" / "x"
    table = folder.save_table(pd.DataFrame({"variant": ["v"], "accuracy": [0.5]}), "t")
    assert pd.read_csv(table)["random_weights"].tolist() == ["r"]
    fig = plt.figure()
    folder.save_figure(fig, "f")
    assert any("random weights (r)" in t.get_text() for t in fig.texts)
    plt.close(fig)
    plain = plots.save_table(pd.DataFrame({"variant": ["v"]}), tmp_path / "plain", "t")  # no module default left
    assert "random_weights" not in pd.read_csv(plain).columns
