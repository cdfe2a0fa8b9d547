"""Notebooks executed without a live frontend (papermill, through `python -m helpers run`): what they show.

`helpers.runs.notebooks` sets `HELPERS_SAVED_RUN=1` in the environment of the kernels it starts. Under it:
- `tqdm.auto` gives text bars that print once, finished (`FinalLineTqdm`), instead of the notebook's widget bars:
  a saved widget bar shows its first state (`0%| | 0/64`) in a notebook that no frontend drew, and JupyterLab does
  not draw the widget state of a notebook it did not save itself;
- the widgets of `helpers.display.interactive` show a static picture and a line saying to run the notebook live.

`helpers/__init__.py` imports this module first, so that every module's `from tqdm.auto import tqdm` gets the text
bars when the variable is set.
"""

from __future__ import annotations

import os
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import tqdm.auto
import tqdm.std

from .env import env_flag
from .errors import environment_flag
from .files import PROJECT_ROOT

SAVED_RUN_ENV = "HELPERS_SAVED_RUN"
# what a saved run's kernel is told of where it comes from: the source notebook and the run folder
SOURCE_NOTEBOOK_ENV, RUN_DIR_ENV = "HELPERS_SOURCE_NOTEBOOK", "HELPERS_RUN_DIR"


def saved_run() -> bool:
    """Whether this process is a kernel that papermill executes for a saved run (no live frontend)."""
    return env_flag(SAVED_RUN_ENV)


@contextmanager
def saved_run_kernels(notebook: str, run_dir: Path):
    """Within: the kernels this process starts (they inherit the environment) run as saved runs of the source
    notebook `notebook` into `run_dir`."""
    origin = {SOURCE_NOTEBOOK_ENV: notebook, RUN_DIR_ENV: str(Path(run_dir).resolve())}
    previous = {name: os.environ.get(name) for name in origin}
    os.environ.update(origin)
    try:
        with environment_flag(SAVED_RUN_ENV):
            yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


OUTPUT_WIDTH = 96  # characters of a notebook's output line that a 1,280-pixel window shows beside the file browser


def wrapped(text: str) -> str:
    """`text`, each of its lines wrapped at word boundaries to OUTPUT_WIDTH (paths and other long words whole)."""
    return "\n".join(textwrap.fill(line, OUTPUT_WIDTH, break_long_words=False, break_on_hyphens=False) or line
                     for line in text.splitlines())


def live_hint(what: str) -> str:
    """A saved run's line in a widget's place: which source notebook to run live, and how, to `what`."""
    notebook = os.environ.get(SOURCE_NOTEBOOK_ENV, "the source notebook")
    run_dir = os.environ.get(RUN_DIR_ENV, "<run folder>")
    return (f"This is a saved run, where widgets are pictures. To {what}, run the source notebook live: `make lab` "
            f"in {PROJECT_ROOT} opens notebooks/; open {notebook} there and set config_path = "
            f'"{run_dir}/config.yaml" in its parameters cell (it writes to its output_dir, not into this run).')


class FinalLineTqdm(tqdm.std.tqdm):
    """A text bar that prints nothing while it runs and its final state once, when it closes (to stdout: a saved
    notebook shows it as plain output, not as an error-coloured stream)."""

    def __init__(self, *args, **kwargs):
        self._final = False
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ascii", False)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self._final:
            return False  # nothing shown (so nothing to clear)
        return super().display(msg, pos)

    def close(self):
        # a bar that leaves no trace (leave=False) prints nothing at all
        self._final = self.leave is not False and not getattr(self, "disable", True)
        super().close()


def use_text_progress() -> None:
    """Make `tqdm.auto.tqdm` (and `tqdm.autonotebook.tqdm`) the final-line text bar, for modules imported after."""
    tqdm.auto.tqdm = FinalLineTqdm
    sys.modules["tqdm.autonotebook"].tqdm = FinalLineTqdm


if saved_run():
    use_text_progress()
