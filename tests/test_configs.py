"""Every config shipped in configs/ loads; the winner's is the winning solution; offline it stops before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import load_config

from .conftest import PROJECT_ROOT

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
SWEEPS = sorted((PROJECT_ROOT / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.models and config.prompts == "winner"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_give_their_points(path, monkeypatch):
    from helpers.runs.sweep import design_points, make_design

    monkeypatch.chdir(PROJECT_ROOT)  # a sweep file names its base config from the project's folder
    points = design_points(make_design(path, [], [], False))
    assert len(points) > 1 and points[0].settings == {} and len({p.id for p in points}) == len(points)


def test_the_winner_config_is_the_winning_solution():
    config = load_config(PROJECT_ROOT / "configs" / "winner.yaml")
    meta, eva = config.models["metaclip"], config.models["eva"]
    assert (meta.backend, meta.arch, meta.pretrained, meta.sharpness) == (
        "open_clip", "ViT-bigG-14-quickgelu", "metaclip_fullcc", 2.3)
    assert (eva.backend, eva.pretrained, eva.revision, eva.sharpness, eva.precision) == (
        "eva_clip", "BAAI/EVA-CLIP-18B", "36bce190dbcec6baf4d28a8ae43b05362196e4be", 2.0, "fp16")
    assert (meta.precision, meta.autocast, eva.autocast) == ("fp32", True, True)  # SPEC 6: under autocast
    assert config.scoring == "joint_softmax_mean" and config.logit_scale == 100
    assert config.ensemble.weights == {"metaclip": 0.5, "eva": 0.5}


def test_reproduce_offline_stops_at_once_with_the_message_for_every_model(tmp_path, scene_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "helpers", "run", "configs/winner.yaml", "--set",
                             f"data.test={scene_dir}", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=120)
    assert result.returncode == 2
    for part in ("models.metaclip", "ViT-bigG-14-quickgelu 'metaclip_fullcc'", "models.eva",
                 "'BAAI/EVA-CLIP-18B' at revision 36bce190dbcec6baf4d28a8ae43b05362196e4be", "local-dir:"):
        assert part in result.stderr
    assert not Path(tmp_path / "run").exists()  # no work was done
