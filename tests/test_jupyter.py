"""The checkout's own Jupyter kernel and settings: in its environment, nothing in the user's home; JupyterLab shows
the checkout's kernel name and saves the committed one; two checkouts side by side each run their own code."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat

from helpers.infra import jupyter
from helpers.infra.jupyter import COMMITTED_DISPLAY_NAME, KERNEL_NAME, install_kernel, kernel_display_name

from .conftest import PROJECT_ROOT


def test_the_kernel_and_its_settings_go_into_the_environment_not_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # IPython would warn that the home is not there
    prefix = tmp_path / "env"
    assert install_kernel(prefix) == KERNEL_NAME
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["display_name"] == kernel_display_name() == f"Python (blur-zeroshot workbench: {PROJECT_ROOT.name})"
    server = json.loads((prefix / "etc" / "jupyter" / "jupyter_server_config.json").read_text())
    assert server["KernelSpecManager"]["allowed_kernelspecs"] == [KERNEL_NAME]  # the launcher offers it alone
    assert server["MappingKernelManager"]["default_kernel_name"] == KERNEL_NAME
    assert (prefix / "share" / "jupyter" / "lab" / "settings" / "overrides.json").is_file()
    assert not (tmp_path / "home").exists()


def test_jupyterlab_shows_the_checkouts_kernel_name_and_saves_the_committed_one(tmp_path):
    """JupyterLab writes the running kernel's name into a notebook it opens: the server shows the checkout's name,
    so that nothing looks changed on opening, and saves the committed one, so that no checkout's name is committed."""
    shutil.copy(PROJECT_ROOT / "notebooks" / "05_ensemble.ipynb", tmp_path / "n.ipynb")
    manager = jupyter.CheckoutContentsManager(root_dir=str(tmp_path))
    model = asyncio.run(manager.get("n.ipynb"))
    assert model["content"]["metadata"]["kernelspec"]["display_name"] == kernel_display_name()
    model["content"]["cells"][0]["source"] = "# edited"
    asyncio.run(manager.save({"type": "notebook", "content": model["content"]}, "n.ipynb"))
    saved = nbformat.read(tmp_path / "n.ipynb", as_version=4)
    assert saved.metadata.kernelspec.display_name == COMMITTED_DISPLAY_NAME and saved.cells[0].source == "# edited"


WHICH_CODE = nbformat.v4.new_notebook(
    cells=[nbformat.v4.new_code_cell("import os, sys, helpers\nprint(sys.executable, helpers.__file__)")],
    metadata={"kernelspec": {"name": KERNEL_NAME, "display_name": COMMITTED_DISPLAY_NAME, "language": "python"}})


def _second_checkout(tmp_path: Path) -> Path:
    """A second clone of the project (its tracked files) with an environment of its own: a venv whose packages are
    this one's, and whose `helpers` is the clone's (as `make setup` installs it, editable)."""
    clone = tmp_path / "clone-b"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # what a clone of this tree holds
    files = subprocess.run(listed, cwd=PROJECT_ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, clone / name)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True)
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "workbench.pth").write_text(f"{clone}\n{sysconfig.get_paths()['purelib']}\n")
    return clone


def test_two_checkouts_side_by_side_each_run_their_own_code(tmp_path):
    """Each checkout registers its kernel in its own environment; a notebook run from either runs that checkout's
    interpreter and helpers, even with a kernel of the same name registered for the whole user account (as earlier
    versions did), and nothing is registered in the user's home."""
    home = tmp_path / "home"
    stale = home / ".local" / "share" / "jupyter" / "kernels" / KERNEL_NAME
    stale.mkdir(parents=True)
    (stale / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f",
                                                            "{connection_file}"], "display_name": "stale",
                                                   "language": "python"}))
    env = {**os.environ, "HOME": str(home)}
    env.pop("JUPYTER_PATH", None)
    clone = _second_checkout(tmp_path)
    nbformat.write(WHICH_CODE, tmp_path / "which.ipynb")
    printed = {}
    for checkout, python in ((PROJECT_ROOT, Path(sys.executable)), (clone, clone / ".venv" / "bin" / "python")):
        subprocess.run([str(python), "-m", "helpers", "install-kernel"], cwd=checkout, env=env, check=True,
                       capture_output=True)
        out = tmp_path / f"which-{checkout.name}.ipynb"
        subprocess.run([str(python), "-m", "papermill", str(tmp_path / "which.ipynb"), str(out), "--no-progress-bar"],
                       cwd=checkout, env=env, check=True, capture_output=True)
        printed[checkout] = nbformat.read(out, as_version=4).cells[0].outputs[0]["text"].split()
    assert printed[PROJECT_ROOT] == [sys.executable, str(PROJECT_ROOT / "helpers" / "__init__.py")]
    assert printed[clone] == [str(clone / ".venv" / "bin" / "python"), str(clone / "helpers" / "__init__.py")]
    assert json.loads((stale / "kernel.json").read_text())["display_name"] == "stale"  # untouched, and unused
    assert sorted(p.name for p in (home / ".local" / "share" / "jupyter" / "kernels").iterdir()) == [KERNEL_NAME]
