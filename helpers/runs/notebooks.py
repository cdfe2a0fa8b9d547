"""`python -m helpers run CONFIG`: the workbench's notebooks executed end to end by papermill.

The inference notebook runs once per model, each in a fresh kernel (so a model's GPU memory is freed before the
next one loads), then the ensemble notebook writes the submission, and the analysis notebooks write their figures
and tables. Everything lands in one run folder; a rerun reuses the inference of models that finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..config import RunConfig, json_digest
from ..infra.distributed import World
from ..infra.files import PROJECT_ROOT, read_json_or_none
from ..infra.jupyter import ensure_kernel
from ..infra.progress import saved_run_kernels
from .pipeline import RunError, model_dir, model_outputs_done, prepare_run

NOTEBOOKS = PROJECT_ROOT / "notebooks"
INSPECT, SHARPNESS, PROMPTS, INFERENCE, ENSEMBLE = (
    "01_inspect.ipynb", "02_preprocessing_ablation.ipynb", "03_prompt_ablation.ipynb", "04_inference.ipynb",
    "05_ensemble.ipynb")


def default_run_dir(config: RunConfig) -> Path:
    """outputs/runs/<name>-<hash of the resolved config>: the same config reruns into the same folder."""
    return Path("outputs") / "runs" / f"{config.name}-{json_digest(config.to_dict())[:8]}"


def local_kernel_manager():
    """A kernel manager that talks to its kernel over local sockets (IPC), not TCP: the kernel and papermill are on
    one machine, and ipykernel warns on every start, on the terminal, that its TCP traffic is not encrypted.

    The sockets get a path of their own in the temporary folder: jupyter_client's default, `kernel-ipc-<n>` in the
    working folder, is taken by whichever of several processes there (a sweep's points) starts a kernel first, and
    the other kernels then never answer."""
    import tempfile
    import uuid

    from jupyter_client.manager import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(tempfile.gettempdir(), f"helpers-kernel-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    return LocalKernelManager


def import_nbformat() -> None:
    """Import nbformat (which papermill imports) without jsonschema's optional IRI format check. That check
    (rfc3987-syntax, pulled in by Jupyter's event schemas) builds a grammar when imported: 1.5-2 s in every process
    that imports nbformat (each run, each point of a sweep). Nothing here checks IRIs, and jsonschema leaves the
    format out when the module cannot be imported: it is blanked while jsonschema is first imported, and only then."""
    if "nbformat" in sys.modules:
        return
    blanked = "rfc3987_syntax" not in sys.modules
    if blanked:
        sys.modules["rfc3987_syntax"] = None
    try:
        import nbformat  # noqa: F401  imports jsonschema
    finally:
        if blanked:
            del sys.modules["rfc3987_syntax"]


def execute(notebook: str, output: Path, parameters: dict, kernel: str, progress: bool = True) -> None:
    import_nbformat()
    import papermill as pm

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        # no live frontend: text progress, widgets as pictures, how to run the notebook live (helpers.infra.progress)
        with saved_run_kernels(notebook, Path(parameters.get("output_dir", output.parent))):
            # the kernel is ended at once when the last cell is done (a kernel that imported torch takes about a
            # second to exit by itself, and nothing is left to wait for: the outputs are in, the files written)
            pm.execute_notebook(NOTEBOOKS / notebook, output, parameters=parameters, kernel_name=kernel,
                                cwd=str(PROJECT_ROOT), progress_bar=progress, shutdown_kernel="immediate",
                                kernel_manager_class=local_kernel_manager())
    except pm.PapermillExecutionError as e:
        first_line = e.source.strip().splitlines()[0] if e.source.strip() else ""
        # a user error is shown in its cell as the one line the command line prints (errors.install_notebook_handler)
        shown = e.traceback[-1] if e.traceback and e.traceback[-1].startswith("error: ") else None
        what = shown.removeprefix("error: ") if shown else " ".join(f"{e.ename}: {e.evalue}".split())
        raise RunError(f"{notebook} failed in cell In [{e.exec_count}] (`{first_line}`): {what} (the executed "
                       f"notebook, with the cell's output, is {output})") from None


def run_summary(run_dir: str | Path) -> str:
    """What `python -m helpers run` prints at the end: where the run is, what it wrote, and how to look at it (compare
    it with another run, or open its executed notebooks in JupyterLab)."""
    import textwrap

    run_dir = Path(run_dir)
    outputs = [n for n in ("submission.csv", "metrics.json", "manifest.json", "config.yaml") if (run_dir / n).is_file()]
    notebooks = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    lines = [f"wrote {run_dir}: {', '.join(outputs)}"]

    def listing(what: str, names: list[str]) -> None:
        if names:
            lines.extend(textwrap.wrap(", ".join(names), 116, initial_indent=f"  {what} ({len(names)}): ",
                                       subsequent_indent="    ", break_on_hyphens=False))

    listing("executed notebooks, notebooks/", notebooks)
    listing("figures, figures/", sorted(p.name for p in (run_dir / "figures").glob("*.png")))
    listing("tables, tables/", sorted(p.name for p in (run_dir / "tables").glob("*.csv")))
    models = (read_json_or_none(run_dir / "manifest.json", dict) or {}).get("models", {})
    random = [n for n, m in models.items() if isinstance(m, dict) and m.get("random_weights")]
    if random:
        lines.append(f"  note: RANDOM weights ({', '.join(random)}): the labels and accuracies are meaningless")
    # `make lab RUN=...` runs in the project root: name the folder from there
    lab_dir = run_dir.resolve()
    lab_dir = lab_dir.relative_to(PROJECT_ROOT) if lab_dir.is_relative_to(PROJECT_ROOT) else lab_dir
    lines += ["next:",
              f"  compare it with another run:  {python_command()} -m helpers compare {run_dir} OTHER_RUN",
              f"  open it in JupyterLab:        make lab RUN={lab_dir}   (the notebooks under notebooks/)"]
    return "\n".join(lines)


def python_command() -> str:
    """This interpreter as the user's shell reaches it: relative to the working folder when inside it (the project's
    `.venv/bin/python`), else its full path; a bare `python` outside the virtual environment has no helpers."""
    executable = os.path.abspath(sys.executable)  # not resolved: the venv's python is a link to the system's
    relative = os.path.relpath(executable)
    return relative if not relative.startswith("..") else executable


def _finished(notebook: Path) -> bool:
    """Whether papermill ran every cell of this executed notebook (it writes the notebook also when a cell fails
    or the run is interrupted)."""
    if not notebook.is_file():
        return False
    import_nbformat()
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    return all(cell.metadata.get("papermill", {}).get("status") == "completed" for cell in cells)


def encode_with_torchrun(config_file: str | Path, nproc: int, progress: bool) -> None:
    """`python -m helpers encode` of the run folder's resolved config under torchrun, with `nproc` processes on this
    machine: the notebooks then find every embedding in the cache."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "helpers", "encode", str(config_file)]
    if not progress:
        command.append("--quiet")
    result = subprocess.run(command)
    if result.returncode != 0:
        raise RunError(f"the encode with {nproc} processes (torchrun) failed with status {result.returncode}; its "
                       "error is printed above, and a rerun resumes from what every process finished")


def run_pipeline(config: RunConfig, output_dir: str | Path | None = None, analyses: bool = True,
                 progress: bool = True, log=print, nproc: int = 1, shared_analyses: str | Path | None = None) -> Path:
    """The notebooks of a loaded config into a run folder (default: `default_run_dir`); returns the folder. The
    preparation (checks, the images read once, the folder claimed) is `prepare_run`'s, as for `predict`; the kernels
    read the run folder's resolved config and what was found of the images. With `shared_analyses` (a folder), an
    analysis notebook whose inputs another run computed is copied from there, and one computed here is added
    (`helpers.runs.analyses`)."""
    run_dir = Path(output_dir) if output_dir else default_run_dir(config)
    data = prepare_run(config, run_dir, World(size=nproc), progress)
    kernel = ensure_kernel()
    base = notebook_parameters(run_dir)
    config_file = base["config_path"]
    executed = run_dir / "notebooks"
    if nproc > 1:
        log(f"encoding with {nproc} processes (torchrun)")
        encode_with_torchrun(config_file, nproc, progress)

    for name in config.models:
        out = executed / f"04_inference-{name}.ipynb"
        if model_outputs_done(run_dir, name, data) and _finished(out):
            log(f"model {name}: reusing the finished inference in {out}")
            continue
        log(f"model {name}: running {INFERENCE}")
        execute(INFERENCE, out, {**base, "model_name": name}, kernel, progress)
        if not json.loads((model_dir(run_dir, name) / "model.json").read_text())["model_loaded"]:
            log(f"model {name}: every embedding came from the cache {config.cache_dir} (nothing encoded, no model "
                "loaded)")
    log(f"ensemble: running {ENSEMBLE}")
    execute(ENSEMBLE, executed / ENSEMBLE, base, kernel, progress)
    if analyses:
        run_analyses(config, run_dir, data, kernel, progress, log, shared_analyses)
    return run_dir


def notebook_parameters(run_dir: Path) -> dict:
    """What every notebook of a run is given: the run folder's resolved config and the folder itself."""
    return {"config_path": str((run_dir / "config.yaml").resolve()), "output_dir": str(run_dir.resolve())}


def run_analyses(config: RunConfig, run_dir: Path, data, kernel: str, progress: bool, log,
                 shared: str | Path | None = None) -> None:
    """The analysis notebooks of a prepared run, each executed, or copied from the store `shared` where it has their
    outputs."""
    from .analyses import AnalysisStore, analysis_key, analysis_notebooks, output_files

    base = notebook_parameters(run_dir)
    store = AnalysisStore(shared) if shared is not None else None
    for analysis in analysis_notebooks(config):
        out = run_dir / "notebooks" / analysis.executed_name
        key = analysis_key(config, analysis, data) if store else None
        computed_in = store.copy_into(analysis, key, run_dir) if store else None
        if computed_in is not None:
            log(f"{analysis.executed_name}: copied from {computed_in} (the same inputs)")
            continue
        before = output_files(run_dir)
        execute(analysis.notebook, out, {**base, **analysis.parameters}, kernel, progress)
        if store:
            written = [path for path, stamp in output_files(run_dir).items() if before.get(path) != stamp]
            store.add(analysis, key, run_dir, written)
    if config.data.dev is None:
        log("no data.dev: skipping the dev-set ablations (preprocessing and prompts)")
