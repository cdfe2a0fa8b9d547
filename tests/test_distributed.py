"""Several processes with torchrun (gloo on the CPU): the encodes shared, the results those of one process; a rank
that fails stops the run, and the rerun resumes; scoring and the ensemble over chunks of rows equal one pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers.research.scoring
import helpers.runs.pipeline
from helpers.config import ConfigError, load_config
from helpers.infra.distributed import World
from helpers.runs.notebooks import run_pipeline
from helpers.runs.pipeline import predict

from .conftest import FAULT_SCRIPT, INTEL_CLASS_MAP, PROJECT_ROOT, fault_config, missing_batches


def torchrun(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def write(config, path: Path) -> str:
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def output_files(out: Path) -> dict[str, bytes]:
    """Every output a run writes that does not record when or how (the manifest and model.json do), or where its
    cache is (config.yaml)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "model.json", "config.yaml")
            and "notebooks" not in p.parts}


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_two_processes_write_what_one_writes_byte_for_byte(scene_dir, tiny_arch, tiny_checkpoints, clean_submission,
                                                           tmp_path):
    # the same threads per process (torchrun's default of one), each run with a cache of its own
    with torch_threads(1):
        predict(fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp_path / "cache-1"), tmp_path / "out-1",
                progress=False)
    config = fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp_path / "cache-2")
    result = torchrun(2, "-m", "helpers", "predict", write(config, tmp_path / "run-2.yaml"), "--output-dir",
                      str(tmp_path / "out-2"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert output_files(tmp_path / "out-2") == output_files(tmp_path / "out-1")
    assert (tmp_path / "out-2" / "submission.csv").read_bytes() == clean_submission  # and two threads in one
    assert json.loads((tmp_path / "out-1" / "manifest.json").read_text())["world_size"] == 1
    assert json.loads((tmp_path / "out-2" / "manifest.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "out-2" / "models" / "a" / "model.json").read_text())["world_size"] == 2
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)
    segments = [p.name for p in (tmp_path / "cache-2" / "images").glob("*/*.seg")]
    assert len({name.split("-")[1] for name in segments}) == 2  # both processes wrote encodes


def test_a_rank_that_fails_stops_the_run_and_the_rerun_resumes(scene_dir, tiny_arch, tiny_checkpoints,
                                                               clean_submission, tmp_path, count_image_batches):
    config = fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp_path / "cache")
    result = torchrun(2, str(FAULT_SCRIPT), "batch:2", write(config, tmp_path / "run.yaml"), "--output-dir",
                      str(tmp_path / "out"), "--quiet", env={"FAULT_RANK": "1"})
    assert result.returncode != 0 and "failed" in result.stderr.lower()
    assert not (tmp_path / "out" / "submission.csv").exists()
    expected = missing_batches(config)
    assert 0 < expected < 10  # rank 1's first batch and rank 0's batches were kept
    predict(config, tmp_path / "out", progress=False)
    assert count_image_batches["n"] == expected
    assert (tmp_path / "out" / "submission.csv").read_bytes() == clean_submission


def test_run_with_two_processes_encodes_first_and_its_notebooks_load_no_model(scene_dir, tiny_arch,
                                                                              tiny_checkpoints, clean_submission,
                                                                              tmp_path):
    config = fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp_path / "cache")
    logs = []
    run_dir = run_pipeline(load_config(write(config, tmp_path / "run.yaml")), output_dir=tmp_path / "run",
                           analyses=False, progress=False, log=logs.append, nproc=2)
    assert logs[0] == "encoding with 2 processes (torchrun)"
    assert (run_dir / "submission.csv").read_bytes() == clean_submission
    for name in "ab":
        assert json.loads((run_dir / "models" / name / "model.json").read_text())["model_loaded"] is False


@pytest.mark.parametrize("dev", [False, True])
def test_scoring_and_the_ensemble_in_chunks_equal_one_pass(dev, make_config, scene_dir, dev_dir, tmp_path,
                                                          monkeypatch):
    data = {"test": str(scene_dir)}
    if dev:
        data["dev"] = {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}
    config = make_config(data=data, models={**{n: vars(m) for n, m in make_config().models.items()},
                                            "b": {**vars(make_config().models["b"]), "sharpness": [1.5, 2.5]}})
    monkeypatch.setattr(helpers.runs.pipeline, "SCORE_BLOCK_ROWS", 4)  # and so the scoring's blocks, in both runs
    monkeypatch.setattr(helpers.research.scoring, "SCORE_BLOCK_ROWS", 4)
    predict(config, tmp_path / "whole", progress=False)
    monkeypatch.setattr(helpers.runs.pipeline, "SCORE_CHUNK_ROWS", 5)  # 38 test images: chunks of 8 rows, the last of 6
    predict(config, tmp_path / "chunks", progress=False)
    whole, chunks = output_files(tmp_path / "whole"), output_files(tmp_path / "chunks")
    assert whole.keys() == chunks.keys() and "models/b/test/image_embeddings.npy" in whole
    assert np.load(tmp_path / "chunks" / "models" / "b" / "test" / "image_embeddings.npy").shape == (2, 38, 32)
    for name in whole:
        assert whole[name] == chunks[name], name


def test_a_model_spread_over_gpus_is_refused_under_torchrun(make_config, tmp_path):
    config = make_config(models={"m": {"backend": "hf_clip", "pretrained": str(tmp_path), "device_map": "auto"}},
                         ensemble={})
    with pytest.raises(ConfigError, match=r"models\.m\.device_map spreads the model over the GPUs, which the 2 "
                                          r"torchrun processes each want one of: run it in one process"):
        predict(config, tmp_path / "out", progress=False, world=World(rank=1, size=2, local_rank=1))
