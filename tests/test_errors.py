"""Every user error is one line: `error: <what, where, how to fix>` and exit status 2, on every command; --debug shows
the traceback instead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers.__main__ import main
from helpers.research.data import DataError

from .conftest import INTEL_CLASS_MAP


@pytest.fixture
def case(make_config, scene_dir, dev_dir, tmp_path):
    """Builds a config (keyword overrides of its top-level keys) in tmp_path; returns its path."""

    def write(**overrides) -> str:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(make_config(**overrides).to_dict(), sort_keys=False))
        return str(path)

    return write


def scene_copy(scene_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "Scene"
    shutil.copytree(scene_dir, root)
    return root


def run_cli(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_malformed_classes_json_names_the_file(case, scene_dir, tmp_path, capsys):
    root = scene_copy(scene_dir, tmp_path)
    (root / "classes.json").write_text("[Buildings,")
    err = run_cli(["predict", case(data={"test": str(root)})], capsys)
    assert f"{root}/classes.json: not valid JSON (Expecting value: line 1 column 2 (char 1)); it must be a list" in err
    (root / "classes.json").write_text('["Sea", "Sea"]')
    assert "class 'Sea' is listed twice" in run_cli(["predict", case(data={"test": str(root)})], capsys)


def test_folders_that_are_files_and_files_that_are_folders(case, scene_dir, dev_dir, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    err = run_cli(["predict", case(data={"test": str(a_file)})], capsys)
    assert f"{a_file}: a file, not a folder (data.test)" in err
    err = run_cli(["predict", case(data={"test": str(scene_dir), "dev": {"path": str(a_file)}})], capsys)
    assert f"{a_file}: a file, not a folder (data.dev.path)" in err
    err = run_cli(["predict", case(), "--output-dir", str(a_file)], capsys)
    assert f"the run folder (--output-dir) {a_file} is a file, not a folder" in err
    err = run_cli(["predict", case(cache_dir=str(a_file)), "--output-dir", str(tmp_path / "o")], capsys)
    assert f"cache_dir {a_file} is a file, not a folder" in err
    assert f"{tmp_path}: is a folder, expected a run config YAML file" in run_cli(["predict", str(tmp_path)], capsys)
    assert f"{a_file}: a file, not a folder (a folder of images is expected)" in run_cli(
        ["estimate-blur", str(a_file)], capsys)
    assert f"--dest {a_file} is a file, not a folder" in run_cli(["download-data", "--dest", str(a_file)], capsys)


def test_an_output_folder_inside_an_input_folder_is_refused(case, scene_dir, dev_dir, tmp_path, capsys):
    inside = scene_dir / "runs" / "x"
    err = run_cli(["predict", case(), "--output-dir", str(inside)], capsys)
    assert f"the run folder {inside} is inside the input folder {scene_dir} (data.test)" in err
    assert not inside.parent.exists()
    err = run_cli(["run", case(), "--output-dir", str(inside)], capsys)
    assert "is inside the input folder" in err
    err = run_cli(["make-dev", str(dev_dir), "--out", str(dev_dir / "dev"), "--sigma", "2", "--quality", "75"], capsys)
    assert f"--out {dev_dir / 'dev'} is inside the source folder {dev_dir}" in err


def test_a_dev_folder_with_empty_class_folders(case, scene_dir, dev_dir, tmp_path, capsys):
    dev = tmp_path / "dev"
    shutil.copytree(dev_dir, dev)
    for folder in ("sea", "street"):
        for p in (dev / folder).iterdir():
            p.unlink()
    err = run_cli(["predict", case(data={"test": str(scene_dir), "dev": {"path": str(dev),
                                                                          "class_map": INTEL_CLASS_MAP}})], capsys)
    assert f"{dev}: no images in the class folder(s) sea, street" in err


def test_prompt_and_number_mistakes(case, tmp_path, capsys):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("groups:\n  basic: ['a photo of a {class}']\n")
    err = run_cli(["predict", case(prompts=str(prompts))], capsys)
    assert "has an unknown placeholder {class}; the class name is written {c}" in err
    prompts.write_text("groups:\n  basic: ['a photo of a {c}']\n  extra: ['a photo of a {c}']\n")
    assert "'a photo of a Buildings' appears twice" in run_cli(["predict", case(prompts=str(prompts))], capsys)
    assert "logit_scale must be a finite number, got nan" in run_cli(
        ["predict", case(), "--set", "logit_scale=.nan"], capsys)
    assert "models.a.batch_size must be between 1 and 65536, got 1000000000000" in run_cli(
        ["predict", case(), "--set", "models.a.batch_size=1000000000000"], capsys)
    assert "fallback_label is 'Lake', not one of the classes" in run_cli(
        ["predict", case(fallback_label="Lake"), "--output-dir", str(tmp_path / "o")], capsys)


def test_unreadable_files_are_named(case, deny_reading, capsys):
    config = Path(case())
    deny_reading(config)
    assert f"{config}: permission denied: make it readable" in run_cli(["predict", str(config)], capsys)


def test_estimate_blur_and_make_dev_list_every_unusable_image(dev_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(dev_dir, src)
    (src / "sea" / "empty.jpg").write_bytes(b"")
    blob = next((dev_dir / "forest").iterdir()).read_bytes()
    (src / "forest" / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    for argv in (["estimate-blur", str(src), "--quiet"],
                 ["make-dev", str(src), "--out", str(tmp_path / "dev"), "--sigma", "2", "--quality", "75", "--quiet"]):
        err = run_cli(argv, capsys)
        assert "2 of 26 images cannot be used, so nothing was done" in err
        assert f"{src}/forest/cut.jpg (cannot be decoded: image file is truncated" in err
        assert f"{src}/sea/empty.jpg (empty file (0 bytes))" in err
    assert not (tmp_path / "dev").exists()
    bad_map = tmp_path / "map.yaml"
    bad_map.write_text("a: [")
    err = run_cli(["make-dev", str(dev_dir), "--out", str(tmp_path / "dev"), "--sigma", "2", "--quality", "75",
                   "--class-map", str(bad_map)], capsys)
    assert f"{bad_map}: not valid YAML: expected the node content, but found '<stream end>' at line 1, column 5" in err


def test_out_of_range_arguments_are_refused_by_the_parser(dev_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["estimate-blur", str(dev_dir), "--limit", "0"])
    assert e.value.code == 2 and "argument --limit: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-dev", str(dev_dir), "--out", "x", "--sigma", "nan", "--quality", "75"])
    assert "argument --sigma: must be between 0 and 100, got nan" in capsys.readouterr().err


def test_debug_shows_the_traceback(case, scene_dir, tmp_path):
    root = scene_copy(scene_dir, tmp_path)
    (root / "classes.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON") as e:
        main(["predict", case(data={"test": str(root)}), "--debug"])
    assert isinstance(e.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("false", False), ("False", False),
                                       ("no", False), ("off", False), ("1", True), ("true", True), ("yes", True)])
def test_environment_flags_read_alike(value, on, monkeypatch):
    from helpers.infra.env import env_flag
    from helpers.infra.errors import DEBUG_ENV, debug_enabled
    from helpers.infra.progress import SAVED_RUN_ENV, saved_run

    for name in (DEBUG_ENV, SAVED_RUN_ENV, "SOME_FLAG"):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert env_flag("SOME_FLAG") is on and debug_enabled() is on and saved_run() is on


def test_notes_go_where_the_last_caller_shows_them(capsys):
    """A process that ran a notebook in-process (notes on stdout) and then the command (notes on stderr)."""
    import logging

    from helpers.infra.errors import show_notes

    show_notes("stdout", "note: ")
    logging.getLogger("helpers.test").info("first")
    show_notes("stderr")
    logging.getLogger("helpers.test").info("second")
    captured = capsys.readouterr()
    assert captured.out == "note: first\n" and captured.err == "second\n"
    assert sum(getattr(h, "shows_notes", False) for h in logging.getLogger("helpers").handlers) == 1
