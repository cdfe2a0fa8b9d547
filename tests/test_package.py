"""The package installs: a wheel built from the tree holds every module and data file of helpers/, and the command
line runs from a non-editable install of it (not from the checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # setuptools' build/ and egg-info, kept out of the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(PROJECT_ROOT)], check=True, cwd=build, env={**os.environ, "PIP_NO_INDEX": "1"})
    (path,) = out.glob("*.whl")
    return path


def test_the_wheel_holds_every_module_and_data_file_of_the_tree(wheel):
    tree = {str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "helpers").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert len(tree) > 40
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sorted(tree - names) == []
    assert {"helpers/research/prompt_sets/winner.yaml", "helpers/runs/references/winner-116.csv"} <= names


def test_the_command_line_runs_from_a_non_editable_install(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import helpers; print(helpers.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)
    out = subprocess.run([sys.executable, "-m", "helpers", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "predict" in out.stdout and "sweep" in out.stdout
    # the installed copy finds its own data: the built-in prompt set and the winner's reference submission
    probe = ("from helpers.research.prompts import load_prompts; from helpers.runs.outputs import reference_path; "
             "p = load_prompts('winner', ['Buildings', 'Forests', 'Glacier', 'Mountains', 'Sea', 'Street']); "
             "print(len(p.texts), reference_path('winner-116'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, reference = out.stdout.split()
    assert count == "312" and Path(reference).is_relative_to(target)
