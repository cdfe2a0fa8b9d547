"""`python -m helpers predict`: what it writes, that it is deterministic, and how it fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers.__main__ import main
from helpers.config import ConfigError, PromptSpec
from helpers.models import WeightsUnavailableError
from helpers.research.data import DataError, load_dev_set
from helpers.runs import pipeline as pipeline_module
from helpers.runs.outputs import SubmissionError, read_submission, validate_submission, write_submission
from helpers.runs.pipeline import load_run_data, predict

from .conftest import CLASSES, INTEL_CLASS_MAP, PROJECT_ROOT, SCENE_IDS


def write_config(tmp_path, config) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return str(path)


def test_the_cli_writes_submission_outputs_and_manifest(make_config, dev_dir, tmp_path):
    config = make_config(data={"test": make_config().data.test,
                               "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}})
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "helpers", "predict", write_config(tmp_path, config),
                             "--output-dir", str(out)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    assert "encode a" in result.stderr and "img" in result.stderr  # the progress bar

    ids, labels = read_submission(out / "submission.csv")
    assert ids == SCENE_IDS and set(labels) <= set(range(6))
    for name in "ab":
        model = out / "models" / name
        assert np.load(model / "text_embeddings.npy").shape == (312, 32)
        assert np.load(model / "test" / "prompt_probs.npy").shape == (38, 312)
        assert np.load(model / "dev" / "image_embeddings.npy").shape == (24, 32)
        assert json.loads((model / "model.json").read_text())["random_weights"] is False

    metrics = json.loads((out / "metrics.json").read_text())
    for summary in [*metrics["dev"]["models"].values(), metrics["dev"]["ensemble"]]:
        lo, hi = summary["ci95"]
        assert summary["images"] == 24 and lo <= summary["accuracy"] <= hi
    assert sum(metrics["test"]["predicted_counts"].values()) == 38

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["packages"]["torch"] == "2.14.1" and manifest["packages"]["open_clip_torch"] == "3.3.0"
    assert manifest["device"]["type"] == "cpu"
    assert manifest["models"]["a"]["precision"] == "fp32"
    assert "commit" in manifest["git"]
    assert manifest["data"]["test"]["images"] == 38 and len(manifest["data"]["test"]["sha256"]) == 64
    assert manifest["data"]["dev"]["images"] == 24
    assert manifest["config"]["models"]["a"]["sharpness"] == 2.3
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == "test"


def test_the_same_config_twice_gives_a_byte_identical_submission(make_config, tmp_path):
    config = make_config()
    predict(config, tmp_path / "one", progress=False)  # encodes
    predict(config, tmp_path / "two", progress=False)  # from the cache
    fresh = make_config(cache_dir=str(tmp_path / "fresh-cache"))
    predict(fresh, tmp_path / "three", progress=False)  # encodes again
    one, two, three = ((tmp_path / r / "submission.csv").read_bytes() for r in ("one", "two", "three"))
    assert one == two == three
    assert one.startswith(b"id_idx,label\n0,") and one.count(b"\n") == 39


def test_random_weights_are_marked_in_the_manifest(make_config, tiny_arch, tmp_path, capsys):
    config = make_config(models={"r": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": "random"}},
                         ensemble={}, data={"test": make_config().data.test, "limit": 5})
    assert main(["predict", write_config(tmp_path, config), "--output-dir", str(tmp_path / "o"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err and "note: RANDOM weights (r)" in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["models"]["r"]["random_weights"] is True
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["random_weights"] == ["r"]
    assert read_submission(tmp_path / "o" / "submission.csv")[0] == [0, 1, 2, 3, 4]


def test_predict_prints_a_summary_says_what_came_from_the_cache_and_keeps_its_folder(make_config, tmp_path,
                                                                                    capsys):
    config = write_config(tmp_path, make_config())
    assert main(["predict", config, "--output-dir", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test: 38 images, predicted Buildings ") and len(out) < 10  # not all of metrics.json
    assert out[-1] == f"wrote {tmp_path / 'o' / 'submission.csv'} (every figure: {tmp_path / 'o' / 'metrics.json'})"
    assert main(["predict", config, "--output-dir", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    # the outputs of the first are done (model.json: of these images and prompts), so nothing runs again
    assert "model a: its outputs in" in err and "model b: its outputs in" in err and "are done" in err
    other = write_config(tmp_path / "other", make_config(scoring="mean_logit")) if (tmp_path / "other").mkdir() is \
        None else None
    before = (tmp_path / "o" / "submission.csv").read_bytes()
    assert main(["predict", other, "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2  # as run refuses it
    assert capsys.readouterr().err == (f"error: {tmp_path / 'o'} holds a run of another config; give another "
                                       "--output-dir\n")
    assert (tmp_path / "o" / "submission.csv").read_bytes() == before


def test_a_device_that_is_not_there_is_one_error_line(make_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    config = write_config(tmp_path, make_config())
    assert main(["predict", config, "--set", "device=cuda", "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("error: device is 'cuda' but CUDA is not available here (use device: auto or "
                                       "cpu)\n")


def test_help_starts_without_torch():
    shown = subprocess.run([sys.executable, "-c", "import sys\nfrom helpers.__main__ import main\ntry:\n"
                            "    main(['--help'])\nexcept SystemExit:\n    print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=PROJECT_ROOT, check=True).stdout
    assert "python -m helpers run CONFIG.yaml" in shown and shown.splitlines()[-1] == "False"


def test_bad_input_is_a_clear_error_with_the_path_named(make_config, tmp_path, capsys):
    config = make_config(data={"test": str(tmp_path / "no-such-folder")})
    assert main(["predict", write_config(tmp_path, config), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-folder: no such folder (data.test)" in err

    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\ndata: {test: /x}\nmodels: {a: {backend: open_clip, arch: A, pretrained: random, "
                    "sharpnes: 2}}\n")
    assert main(["predict", str(typo)]) == 2
    assert "unknown key 'sharpnes' in models.a; did you mean 'sharpness'?" in capsys.readouterr().err


def test_a_model_whose_checkpoint_is_missing_is_an_error_not_random_weights(make_config, tiny_arch, tmp_path, capsys):
    config = make_config(models={"a": {"backend": "open_clip", "arch": str(tiny_arch),
                                       "pretrained": str(tmp_path / "missing.pt")}}, ensemble={})
    assert main(["predict", write_config(tmp_path, config), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "o" / "submission.csv").exists()


def test_submissions_are_validated():
    validate_submission([0, 1], [0, 5], 6)
    with pytest.raises(SubmissionError, match="more than once"):
        validate_submission([0, 0], [0, 1], 6)
    with pytest.raises(SubmissionError, match="integers in 0..5"):
        validate_submission([0, 1], [0, 6], 6)
    with pytest.raises(SubmissionError, match="2 ids but 1 labels"):
        validate_submission([0, 1], [0], 6)


def test_write_submission_refuses_bad_rows_and_leaves_no_file(tmp_path):
    with pytest.raises(SubmissionError):
        write_submission(tmp_path / "s.csv", [0, 1], [0, -1], 6)
    assert not list(tmp_path.iterdir())


def test_dev_sets_map_folder_names_and_stay_balanced_when_limited(dev_dir):
    dev = load_dev_set(dev_dir, CLASSES, INTEL_CLASS_MAP)
    assert len(dev) == 24 and np.bincount(dev.labels).tolist() == [4] * 6
    small = load_dev_set(dev_dir, CLASSES, INTEL_CLASS_MAP, limit=12)
    assert np.bincount(small.labels).tolist() == [2] * 6
    with pytest.raises(DataError, match="forest: folder maps to 'forest'"):
        load_dev_set(dev_dir, CLASSES, {k: v for k, v in INTEL_CLASS_MAP.items() if k != "forest"})


def test_a_prepared_run_folder_records_the_images_so_kernels_do_not_read_them_again(make_config, tmp_path,
                                                                                     monkeypatch):
    """predict/run read and hash every image once (prepare_run) and record it in run_data.json; a notebook's kernel
    (load_run_data with recorded_in) lists and stats the files and reads none of them, unless one changed."""
    config = make_config(data={"test": make_config().data.test, "limit": 8})
    predict(config, tmp_path / "o", progress=False)
    first = load_run_data(config)
    reads = []
    original = pipeline_module.check_images
    monkeypatch.setattr(pipeline_module, "check_images",
                        lambda images, *args: reads.append(images) or original(images, *args))
    again = load_run_data(config, recorded_in=tmp_path / "o")
    assert reads == [] and again.digests == first.digests and again.fingerprints() == first.fingerprints()
    changed = again.splits["test"].files[3]
    changed.touch()  # a new modification time: the record no longer vouches for the set
    assert load_run_data(config, recorded_in=tmp_path / "o").digests == first.digests and len(reads) == 1
    assert load_run_data(config, recorded_in=tmp_path / "elsewhere").digests == first.digests and len(reads) == 2


def test_a_prepared_run_folder_records_the_prompt_check_so_kernels_load_no_tokenizer(make_config, tmp_path,
                                                                                    monkeypatch):
    """The prompt check (every model's tokenizer: open_clip's import alone is seconds) runs once, when the run is
    prepared; a kernel of the run reads in run_data.json that it passed for these prompts and models, and checks
    again when they differ."""
    config = make_config(data={"test": make_config().data.test, "limit": 8})
    predict(config, tmp_path / "o", progress=False)
    checked = []
    original = pipeline_module.check_prompts
    monkeypatch.setattr(pipeline_module, "check_prompts", lambda *args: checked.append(args) or original(*args))
    data = load_run_data(config, recorded_in=tmp_path / "o")
    assert checked == []
    config.models["a"].truncate = True
    load_run_data(config, recorded_in=tmp_path / "o")
    assert len(checked) == 1
    config.models["a"].truncate = False
    config.prompts = PromptSpec(exclude=[data.prompts.prompts[0].group])
    load_run_data(config, recorded_in=tmp_path / "o")
    assert len(checked) == 2


def test_a_weights_check_that_passed_is_kept_in_the_cache_and_a_later_run_imports_no_torch(make_config, tmp_path,
                                                                                          monkeypatch):
    """Reading a torch checkpoint's contents (the weights check) imports torch: a check that passed is kept in the
    cache, and a later run of the same models on weights files that did not change, in a process of its own (a
    sweep's point), reads no checkpoint and imports no torch before its notebooks. Weights named by a tag are checked
    every time, a rewritten weights file again, and a check that failed is not kept."""
    config = make_config(data={"test": make_config().data.test, "limit": 8})
    weights = tmp_path / "a.pt"  # a copy of the session's: it is rewritten below
    weights.write_bytes(Path(config.models["a"].pretrained).read_bytes())
    config.models["a"].pretrained = str(weights)
    checked = []
    original = pipeline_module.check_models
    monkeypatch.setattr(pipeline_module, "check_models", lambda config: checked.append(1) or original(config))
    for _ in range(2):
        pipeline_module.prepare_run(config, None, progress=False)
    assert len(checked) == 1 and len(list((Path(config.cache_dir) / "weights_checks").glob("*.json"))) == 1

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    later_run = ("import sys; from helpers.config import load_config; from helpers.runs.pipeline import prepare_run; "
                 f"prepare_run(load_config({str(config_file)!r}), None, progress=False); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", later_run], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"

    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    pipeline_module.prepare_run(config, None, progress=False)
    assert len(checked) == 2
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short: not a readable checkpoint
    for _ in range(2):
        with pytest.raises(WeightsUnavailableError, match="not a readable checkpoint"):
            pipeline_module.prepare_run(config, None, progress=False)
    assert len(checked) == 4 and len(list((Path(config.cache_dir) / "weights_checks").glob("*.json"))) == 2
    config.models["a"].pretrained = "laion2b_s34b_b79k"  # a tag: found in the hub's cache, or downloadable
    assert pipeline_module.weights_check_key(config) is None


def test_a_prompt_check_that_passed_is_kept_in_the_cache_for_later_runs(make_config, tmp_path, monkeypatch):
    """A sweep's points share a cache: the prompt check of the first run is kept there, and a later run of the same
    prompts and models, in a folder of its own, loads no tokenizer (no open_clip import in its process). A rewritten
    architecture file is checked again, and a check that failed is not kept."""
    config = make_config(data={"test": make_config().data.test, "limit": 8})
    arch = tmp_path / "arch.json"  # a copy of the session's: its modification time changes below
    arch.write_bytes(Path(config.models["a"].arch).read_bytes())
    config.models["a"].arch = str(arch)
    checked = []
    original = pipeline_module.check_prompts
    monkeypatch.setattr(pipeline_module, "check_prompts", lambda *args: checked.append(args) or original(*args))
    data = load_run_data(config)
    load_run_data(config)
    assert len(checked) == 1 and len(list((Path(config.cache_dir) / "prompt_checks").glob("*.json"))) == 1
    os.utime(arch, ns=(arch.stat().st_atime_ns, arch.stat().st_mtime_ns + 10**9))
    load_run_data(config)
    assert len(checked) == 2

    def refuses(*args):
        checked.append(args)
        raise ConfigError("prompts: too long")

    monkeypatch.setattr(pipeline_module, "check_prompts", refuses)
    config.prompts = PromptSpec(exclude=[data.prompts.prompts[0].group])
    for _ in range(2):
        with pytest.raises(ConfigError, match="too long"):
            load_run_data(config)
    assert len(checked) == 4
