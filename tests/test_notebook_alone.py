"""Each notebook alone, first thing on a fresh clone: the dev set its config says how to build is built on first
use, and 05 runs the inference it needs; a dev set that cannot be built says where its photos should be."""

import ast
import json
import subprocess

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers.config import load_config
from helpers.infra.jupyter import ensure_kernel
from helpers.research.data import DataError
from helpers.research.devset import build_missing_dev_set
from helpers.runs.notebooks import NOTEBOOKS, execute
from helpers.runs.outputs import read_submission
from helpers.runs.pipeline import load_run_data

from .conftest import INTEL, INTEL_CLASS_MAP, PROJECT_ROOT, SCENE_IDS, require_shared

NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_demo_config_builds_its_dev_set_on_first_use(tmp_path, scene_dir):
    """configs/demo.yaml says how to build its dev set (data.dev.build): the first command or notebook that loads the
    config builds it, as `make dev-demo` does."""
    require_shared(INTEL)
    out = tmp_path / "dev-demo"
    config = load_config(PROJECT_ROOT / "configs" / "demo.yaml", [f"data.dev.path={out}", f"data.test={scene_dir}",
                                                                  f"data.dev.build.source={INTEL}"])
    data = load_run_data(config)
    dev = data.splits["dev"]
    assert len(dev) == 120 and np.bincount(dev.labels).tolist() == [20] * 6
    degradation = json.loads((out / "degradation.json").read_text())["degradation"]
    assert (degradation["sigma"], degradation["jpeg_quality"]) == (6.26, 75)
    assert not build_missing_dev_set(config.data.dev, data.classes)  # there now: not built again
    printed = subprocess.run(["make", "-n", "-s", "dev-demo"], cwd=PROJECT_ROOT, check=True, capture_output=True,
                             text=True).stdout
    assert " -m helpers make-dev --config configs/demo.yaml " in printed


def test_a_dev_set_that_cannot_be_built_says_where_its_photos_should_be(make_config, tmp_path):
    config = make_config(data={"test": make_config().data.test, "dev": {
        "path": str(tmp_path / "dev"), "build": {"source": str(tmp_path / "photos"), "sigma": 6.26, "quality": 75}}})
    with pytest.raises(DataError, match=rf"^{tmp_path}/dev: no such folder \(data.dev.path\), and the labeled photos "
                                        rf"to build it from are not there either: {tmp_path}/photos "
                                        r"\(data.dev.build.source\)"):
        load_run_data(config)


def default_parameters(path) -> dict:
    """The values a notebook's parameters cell assigns (literals)."""
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign) for t in node.targets}


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_each_notebook_runs_alone_from_nothing(path, scene_dir, dev_dir, tiny_arch, tiny_checkpoints, tmp_path):
    """A notebook run alone, first thing on a fresh clone: no dev set yet (the config says how to build it), no other
    notebook run before (05 runs the inference it needs), nothing in the cache; its defaults name the demo config,
    which loads and says how to build its dev set. Here with the tiny models, into a fresh folder."""
    defaults = default_parameters(path)
    demo = load_config(PROJECT_ROOT / defaults["config_path"])
    assert demo.data.dev.build is not None and defaults["output_dir"] == "outputs/notebooks"
    assert defaults.get("model_name") in (None, *demo.models)
    entry = {"backend": "open_clip", "arch": str(tiny_arch), "precision": "fp32"}
    first, second = demo.models  # as the demo: the second with random weights
    raw = {"name": "alone", "data": {"test": str(scene_dir), "dev": {
               "path": str(tmp_path / "dev"), "build": {"source": str(dev_dir), "sigma": 6.26, "quality": 75,
                                                        "class_map": INTEL_CLASS_MAP}}},
           "models": {first: {**entry, "sharpness": 2.3, "pretrained": str(tiny_checkpoints[0])},
                      second: {**entry, "sharpness": 2.0, "pretrained": "random", "seed": 2}},
           "cache_dir": str(tmp_path / "cache"), "num_workers": 0,
           "analysis": {"inspect_images": 2, "sharpness_grid": [1.0, 2.3], "weight_grid": [0.4, 0.5],
                        "restoration_grid": [{"wiener": {"sigma": "auto"}}]}}
    config = tmp_path / "alone.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    execute(path.name, tmp_path / path.name, {"config_path": str(config), "output_dir": str(out)}, ensure_kernel(),
            progress=False)
    assert len(list((tmp_path / "dev").rglob("*.jpg"))) == 24  # built on first use
    if path.name == "05_ensemble.ipynb":
        assert read_submission(out / "submission.csv")[0] == SCENE_IDS
    if path.name == "01_inspect.ipynb":  # the dev set built here records its clean photos: restoration is measured
        quality = pd.read_csv(out / "tables" / "restoration_quality.csv").set_index("setting")
        (wiener,) = [s for s in quality.index if s.startswith("wiener")]
        assert quality.loc["as given", "gain_db"] == 0 and quality.loc[wiener, "gain_db"] > 0.5
    if path.name == "02_preprocessing_ablation.ipynb":
        assert (out / "figures" / "preprocessing_ablation.png").is_file()
    book = nbformat.read(tmp_path / path.name, as_version=4)
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    banners = [i for i, o in enumerate(outputs) if "Random weights" in o.get("data", {}).get("text/markdown", "")]
    assert banners == [0] and second in outputs[0]["data"]["text/markdown"]  # at the top, once
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]  # no pink box: open_clip's
    # warning that random weights are random is not logged, the workbench's notes are plain output
