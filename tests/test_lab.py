"""JupyterLab in headless Chromium (Debian's chromium, driven by Playwright), as a researcher meets the workbench: a
source notebook opens with the checkout's kernel and nothing marked changed, the launcher offers that kernel only,
and a saved run's tables fit a 1,280-pixel window."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest
import yaml

from helpers.infra.jupyter import KERNEL_NAME, ensure_kernel, kernel_display_name
from helpers.runs.notebooks import execute

from .conftest import INTEL_CLASS_MAP, PROJECT_ROOT

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """JupyterLab started from this checkout's environment on a folder of its own; yields its address."""
    if CHROMIUM is None:
        message = "Debian's chromium is not installed (make setup installs it where it can)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    ensure_kernel()
    (tmp_path / "root").mkdir()
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # a researcher's fresh account: no settings, workspaces
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
                               "--IdentityProvider.token=", "--ServerApp.password=",
                               f"--ServerApp.root_dir={tmp_path / 'root'}"], env=env,
                              stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: its kernels take long to shut down
            server.kill()
            server.wait()


def _saved_ensemble(folder, scene_dir, dev_dir, tiny_arch, tiny_checkpoints):
    """05_ensemble as a run saves it (papermill, the saved-run environment), its tables shown, on the tiny models."""
    model = {"backend": "open_clip", "arch": str(tiny_arch), "precision": "fp32"}
    raw = {"name": "lab", "data": {"test": str(scene_dir), "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}},
           "models": {"metaclip": {**model, "pretrained": str(tiny_checkpoints[0]), "sharpness": 2.3},
                      "eva": {**model, "pretrained": "random", "seed": 2, "sharpness": 2.0}},
           "cache_dir": str(folder / "cache"), "num_workers": 0, "analysis": {"weight_grid": [0.4, 0.5, 0.6]}}
    config = folder / "lab.yaml"
    config.write_text(yaml.safe_dump(raw))
    execute("05_ensemble.ipynb", folder / "root" / "run" / "05_ensemble.ipynb",
            {"config_path": str(config), "output_dir": str(folder / "run")}, ensure_kernel(), progress=False)


def test_jupyterlab_as_a_researcher_meets_it(lab, tmp_path, scene_dir, dev_dir, tiny_arch, tiny_checkpoints):
    from playwright.sync_api import expect, sync_playwright

    root = tmp_path / "root"
    shutil.copytree(PROJECT_ROOT / "notebooks", root / "notebooks")
    _saved_ensemble(tmp_path, scene_dir, dev_dir, tiny_arch, tiny_checkpoints)
    specs = json.loads(urllib.request.urlopen(f"{lab}/api/kernelspecs").read())
    assert list(specs["kernelspecs"]) == [KERNEL_NAME] and specs["default"] == KERNEL_NAME  # the launcher: it alone
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{lab}/lab/tree/notebooks/01_inspect.ipynb")
        # "No Kernel" until the kernel has started: on a loaded machine that takes a while
        expect(page.locator(".jp-Toolbar-kernelName").first).to_have_text(kernel_display_name(), timeout=120_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
        page.screenshot(path=str(tmp_path / "source.png"))
        assert page.locator(".jp-mod-dirty").count() == 0  # opening changed nothing

        page.goto(f"{lab}/lab/tree/run/05_ensemble.ipynb")
        # the outputs render one after another: wait for all three tables, not the first
        page.wait_for_function("n => document.querySelectorAll('.jp-OutputArea-output table').length >= n", arg=3,
                               timeout=60_000)
        tables = page.locator(".jp-OutputArea-output:has(table)")
        for i in range(tables.count()):  # each table within its output area: nothing cut off at the right
            tables.nth(i).scroll_into_view_if_needed()
            assert tables.nth(i).evaluate("e => e.scrollWidth <= e.clientWidth + 1"), i
        page.screenshot(path=str(tmp_path / "saved.png"))
        assert page.locator(".jp-mod-dirty").count() == 0
        browser.close()
    assert nbformat.read(root / "notebooks" / "01_inspect.ipynb", as_version=4) == nbformat.read(
        PROJECT_ROOT / "notebooks" / "01_inspect.ipynb", as_version=4)  # nothing saved into the notebook
