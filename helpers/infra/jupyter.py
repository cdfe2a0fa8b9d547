"""The checkout's own Jupyter: its kernel and its JupyterLab and server settings, all inside the virtual environment
(`sys.prefix`), nothing in the user's home. Two checkouts side by side each have theirs: JupyterLab and papermill
started from a checkout's `.venv` find that environment's kernel first (jupyter_core prefers the environment's
paths over the user's inside a virtual environment), so a notebook runs the code of the checkout it was opened in,
and the kernel's name says which checkout that is.

The committed notebooks name the kernel without the checkout (`COMMITTED_DISPLAY_NAME`). JupyterLab writes the
running kernel's name into a notebook it opens, which would mark every notebook changed on opening and put one
checkout's name into the files; the server a checkout starts therefore shows its notebooks with its own kernel name
and saves them with the committed one (`CheckoutContentsManager`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .files import PROJECT_ROOT, atomic_write_text, read_json_or_none

KERNEL_NAME = "blur-zeroshot"  # the committed notebooks name it; each checkout's environment has its own
COMMITTED_DISPLAY_NAME = "Python (blur-zeroshot workbench)"

# JupyterLab's settings (share/jupyter/lab/settings/overrides.json under sys.prefix): no "Jupyter news" pop-up asking
# a new user whether to fetch news from the internet (offline it could not anyway)
LAB_SETTINGS = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false"}}
# the server's (etc/jupyter/jupyter_server_config.json under sys.prefix): the launcher offers this kernel only, not
# also ipykernel's generic "Python 3 (ipykernel)", which would run the notebooks without the project's settings
SERVER_SETTINGS = {"KernelSpecManager": {"allowed_kernelspecs": [KERNEL_NAME], "ensure_native_kernel": False},
                   "MappingKernelManager": {"default_kernel_name": KERNEL_NAME},
                   "ServerApp": {"contents_manager_class": "helpers.infra.jupyter.CheckoutContentsManager"}}


def kernel_display_name() -> str:
    """What JupyterLab shows for the kernel: the project and the checkout's folder, so that two checkouts differ."""
    return f"{COMMITTED_DISPLAY_NAME.removesuffix(')')}: {PROJECT_ROOT.name})"


def _with_display_name(content: dict, display_name: str) -> None:
    """Set the display name of the project's kernel in a notebook's metadata (other kernels are left alone)."""
    spec = content.get("metadata", {}).get("kernelspec")
    if isinstance(spec, dict) and spec.get("name") == KERNEL_NAME:
        spec["display_name"] = display_name


def _contents_manager():
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager

    class CheckoutContentsManager(AsyncLargeFileManager):
        """jupyter_server's default contents manager, showing notebooks with this checkout's kernel name and saving
        them with the committed one (see the module's docstring)."""

        async def get(self, path, content=True, type=None, format=None, require_hash=False):
            model = await super().get(path, content, type, format, require_hash)
            if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
                _with_display_name(model["content"], kernel_display_name())
            return model

        async def save(self, model, path=""):
            if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
                _with_display_name(model["content"], COMMITTED_DISPLAY_NAME)
            saved = await super().save(model, path)
            return saved

    return CheckoutContentsManager


def __getattr__(name: str):
    if name == "CheckoutContentsManager":  # built on first use: jupyter_server is only imported by a server
        return _contents_manager()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install_kernel(prefix: str | Path = sys.prefix) -> str:
    """Register this interpreter as the kernel the notebooks name, in `prefix` (this environment), and write the
    project's JupyterLab and server settings there."""
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL_NAME, display_name=kernel_display_name(), prefix=str(prefix))
    install_lab_settings(prefix)
    install_server_settings(prefix)
    return KERNEL_NAME


def _merged_json(path: Path, values: dict) -> None:
    """Merge `values` (two levels: section -> settings) into the JSON file at `path`, keeping what else it sets."""
    settings = read_json_or_none(path, dict) or {}  # a damaged file: Jupyter could not read it either
    for section, section_values in values.items():
        settings[section] = {**settings.get(section, {}), **section_values}
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def install_lab_settings(prefix: str | Path = sys.prefix) -> Path:
    """Merge LAB_SETTINGS into `<prefix>/share/jupyter/lab/settings/overrides.json` (the defaults JupyterLab starts
    from in this environment; a user's own settings still win), keeping whatever else the file sets."""
    path = Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    _merged_json(path, LAB_SETTINGS)
    return path


def install_server_settings(prefix: str | Path = sys.prefix) -> Path:
    """Merge SERVER_SETTINGS into `<prefix>/etc/jupyter/jupyter_server_config.json`, read by a server started from
    this environment."""
    path = Path(prefix) / "etc" / "jupyter" / "jupyter_server_config.json"
    _merged_json(path, SERVER_SETTINGS)
    return path


def ensure_kernel() -> str:
    """The project's kernel, (re)registered in this environment if it is missing there or points at another
    interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if Path(spec.argv[0]) == Path(sys.executable) and spec.display_name == kernel_display_name():
            return KERNEL_NAME
    except NoSuchKernel:
        pass
    return install_kernel()
