"""The five notebooks on either kind of valid config: one with a test set only, one with a dev set only. Each runs
end to end; where a section needs the split the config lacks, the notebook says in one sentence what it skips and
why. Kept cheap: one tiny model, 8 test images, 12 dev images, one-factor grids."""

import json

import nbformat
import pandas as pd
import pytest
import yaml

from helpers.config import load_config
from helpers.infra.jupyter import ensure_kernel
from helpers.runs.notebooks import PROMPTS, SHARPNESS, execute, run_pipeline
from helpers.runs.outputs import read_submission
from helpers.runs.pipeline import predict

from .conftest import CLASSES, INTEL_CLASS_MAP, SCENE_IDS

NO_TEST = "No test set in this config (data.test):"
NO_DEV = "No dev set in this config (data.dev):"


def _config(folder, scene_dir, dev_dir, tiny_arch, tiny_checkpoints, kind: str):
    data = ({"test": str(scene_dir), "limit": 8} if kind == "test" else
            {"dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP, "limit": 12}, "classes": CLASSES})
    raw = {"name": f"{kind}-only", "data": data,
           # fp32 named: the kernels resolve `auto` for their machine
           "models": {"a": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(tiny_checkpoints[0]),
                            "sharpness": 2.3, "precision": "fp32"}},
           "cache_dir": str(folder.parent / "cache"), "num_workers": 0,
           "analysis": {"inspect_images": 2, "sharpness_grid": [2.3], "drop_thresholds": [0.002],
                        "restoration_grid": [{"wiener": {"sigma": "auto"}}]}}
    path = folder / f"{kind}-only.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _text(book) -> str:
    """What a saved notebook prints, its lines joined (a sentence wrapped to the output's width reads whole)."""
    texts = [o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
             for c in book.cells for o in c.get("outputs", [])]
    return " ".join("".join(texts).split())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, scene_dir, dev_dir, tiny_arch, tiny_checkpoints) -> dict:
    """Each config's run: `python -m helpers run` (04, 05, 01, and 02, 03 where there is a dev set), and 02, 03 run
    alone on the test-only config, which the run leaves out. Both share a cache (the prompts' embeddings)."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for kind in ("test", "dev"):
        folder = root / kind
        folder.mkdir()
        config = _config(folder, scene_dir, dev_dir, tiny_arch, tiny_checkpoints, kind)
        logs = []
        run_dir = run_pipeline(load_config(config), output_dir=folder / "run", progress=False, log=logs.append)
        out[kind] = {"dir": run_dir, "logs": logs}
    base = {"config_path": str(out["test"]["dir"] / "config.yaml"), "output_dir": str(root / "test" / "alone")}
    notebooks = out["test"]["dir"] / "notebooks"
    execute(SHARPNESS, notebooks / SHARPNESS, base, ensure_kernel(), progress=False)
    execute(PROMPTS, notebooks / "03_prompt_ablation-a.ipynb", {**base, "model_name": "a"}, ensure_kernel(),
            progress=False)
    return out


NOTEBOOKS = ["01_inspect.ipynb", "02_preprocessing_ablation.ipynb", "03_prompt_ablation-a.ipynb",
             "04_inference-a.ipynb", "05_ensemble.ipynb"]
# the sentences each notebook says on each kind of config: what it skips, and why
SKIPS = {"test": {"01_inspect.ipynb": NO_DEV, "02_preprocessing_ablation.ipynb": NO_DEV,
                  "03_prompt_ablation-a.ipynb": NO_DEV, "05_ensemble.ipynb": NO_DEV},
         "dev": {"01_inspect.ipynb": NO_TEST, "05_ensemble.ipynb": NO_TEST}}


@pytest.mark.parametrize("kind", ["test", "dev"])
def test_every_notebook_finishes_and_says_what_it_skips(runs, kind):
    notebooks = runs[kind]["dir"] / "notebooks"
    assert sorted(p.name for p in notebooks.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        book = nbformat.read(notebooks / name, as_version=4)
        outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], name
        assert all(c.metadata.papermill.status == "completed" for c in book.cells), name
        text = _text(book)
        for sentence in (NO_TEST, NO_DEV):
            assert (sentence in text) == (SKIPS[kind].get(name) == sentence), (name, text)
            assert text.count(sentence) <= 1, name  # once


def test_a_test_only_run_writes_the_submission(runs):
    run_dir = runs["test"]["dir"]
    assert read_submission(run_dir / "submission.csv")[0] == SCENE_IDS[:8]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "dev" not in metrics and metrics["test"]["images"] == 8
    assert "no data.dev: skipping the dev-set ablations (preprocessing and prompts)" in runs["test"]["logs"]


def test_a_dev_only_run_writes_dev_metrics_and_no_submission(runs):
    run_dir = runs["dev"]["dir"]
    assert not (run_dir / "submission.csv").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test" not in metrics and metrics["dev"]["images"] == 12
    assert 0 <= metrics["dev"]["ensemble"]["accuracy"] <= 1
    for name in ("sharpness_ablation", "prompt_groups-a", "dev_accuracy", "transductive"):
        assert (run_dir / "tables" / f"{name}.csv").is_file(), name
    # sigma: auto without a test set is the dev set's estimated blur (these dev photos are sharp: about 1 px or less)
    ablation = pd.read_csv(run_dir / "tables" / "preprocessing_ablation.csv")
    (wiener,) = [v for v in ablation["variant"] if v.startswith("wiener")]
    assert 0 < float(wiener.split("sigma=")[1].split()[0]) < 1.5


@pytest.mark.parametrize("kind", ["test", "dev"])
def test_predict_writes_what_the_run_wrote(runs, kind, tmp_path):
    """`python -m helpers predict` on the same config (every embedding in the cache now): the same submission, or
    none and the same dev metrics."""
    run_dir = runs[kind]["dir"]
    metrics = predict(load_config(run_dir / "config.yaml"), tmp_path / "p", progress=False)
    assert (tmp_path / "p" / "submission.csv").exists() == (kind == "test")
    if kind == "test":
        assert (tmp_path / "p" / "submission.csv").read_bytes() == (run_dir / "submission.csv").read_bytes()
    else:
        assert metrics["dev"] == json.loads((run_dir / "metrics.json").read_text())["dev"]
