"""Each analysis once: runs that share what an analysis notebook reads share its outputs.

The analysis notebooks of a run are 01_inspect (the test and dev images), 02_preprocessing_ablation (every model on
the dev set at each sharpening factor) and 03_prompt_ablation, once per model (prompt groups and scoring modes from the
model's dev-set embeddings). Their outputs depend on nothing but the parts of the config each reads (`reads`) and the
images (their content digests, as the run found them): a sweep's points that change only the ensemble, or another
model's sharpening, have the same 01, and the same 03 of every model they leave as it is.

With a store (a folder: a sweep passes its `analyses/`), a run executes an analysis notebook only when the store has
no outputs for its inputs, and then adds them (the executed notebook, the figures and tables it wrote), whole or not at
all; a later run with the same inputs copies them into its own run folder instead, the copy's paths made its own, with
a line that says which run computed it. The embedding cache already shares the encodes: this shares the rest, the
kernel's start (several seconds), the scoring and the bootstrap intervals.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, json_digest
from ..infra.files import atomic_write_bytes, atomic_write_text, read_json_or_none
from ..models.backends import BACKENDS
from .notebooks import INSPECT, NOTEBOOKS, PROMPTS, SHARPNESS
from .outputs import write_json
from .pipeline import RunData

OUTPUT_FOLDERS = ("figures", "tables")  # what a notebook writes into its run folder, besides itself
# what no analysis notebook reads: where things go, how many processes, and what only 04/05 use
NOT_READ = ("name", "cache_dir", "num_workers", "ensemble", "reference", "fallback_label", "transductive")
NOT_READ_ANALYSIS = ("weight_grid", "drop_thresholds")  # analysis.*: the ensemble notebook's
SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class AnalysisNotebook:
    notebook: str  # the source notebook's file name
    model: str | None = None  # the model it is about (03, once per model)

    @property
    def executed_name(self) -> str:
        return f"{Path(self.notebook).stem}-{self.model}.ipynb" if self.model else self.notebook

    @property
    def parameters(self) -> dict:
        return {"model_name": self.model} if self.model else {}


def analysis_notebooks(config: RunConfig) -> list[AnalysisNotebook]:
    """A run's analysis notebooks, in the order they run (the dev-set ablations need a dev set)."""
    notebooks = [AnalysisNotebook(INSPECT)]
    if config.data.dev is not None:
        notebooks += [AnalysisNotebook(SHARPNESS), *(AnalysisNotebook(PROMPTS, name) for name in config.models)]
    return notebooks


def reads(config: RunConfig, analysis: AnalysisNotebook) -> dict:
    """The parts of the config an analysis notebook reads: the whole config but what it does not read, so that a key
    added to the config one day counts until it is known not to. 01 reads the data, not the models (only which have
    random weights, which its figures name), prompts or scoring; 02 every model; 03 its own model."""
    raw = {k: v for k, v in config.to_dict().items() if k not in NOT_READ}
    raw["analysis"] = {k: v for k, v in raw["analysis"].items() if k not in NOT_READ_ANALYSIS}
    raw["random_weights"] = sorted(config.random_weight_models())
    if analysis.notebook == INSPECT:
        for key in ("models", "prompts", "scoring", "logit_scale"):
            del raw[key]
        del raw["analysis"]["sharpness_grid"]
    else:
        del raw["analysis"]["inspect_images"]
    if analysis.notebook == PROMPTS:
        raw["models"] = {analysis.model: raw["models"][analysis.model]}
        del raw["analysis"]["sharpness_grid"], raw["analysis"]["restoration_grid"]
    return {"notebook": analysis.notebook, "model": analysis.model, "config": raw}


def analysis_key(config: RunConfig, analysis: AnalysisNotebook, data: RunData) -> str:
    """What an analysis notebook's outputs depend on, as a digest: what it reads of the config, the images as the
    run found them (their digests, labels and classes), and the notebook itself; for the notebooks that score, also
    the prompts' text (a prompt-set file is named by its path) and the weights of the models they read (a file's
    size and time: a model folder rewritten in place)."""
    read = reads(config, analysis)
    source = hashlib.sha256((NOTEBOOKS / analysis.notebook).read_bytes()).hexdigest()
    scored = {}
    if "models" in read["config"]:
        scored = {"prompts": json_digest(data.prompts.texts),
                  "weights": {name: BACKENDS[config.models[name].backend](name, config.models[name]).identity()
                              for name in read["config"]["models"]}}
    return json_digest({**read, **scored, "classes": data.classes, "images": data.fingerprints(), "source": source})


def output_files(run_dir: Path) -> dict[Path, tuple[int, int]]:
    """The files of a run folder's figures/ and tables/, with their size and modification time."""
    found = {}
    for folder in OUTPUT_FOLDERS:
        for path in sorted((run_dir / folder).glob("*")) if (run_dir / folder).is_dir() else []:
            if path.is_file():
                stat = path.stat()
                found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


class AnalysisStore:
    """A folder of analysis outputs by key: `<executed name>-<key>/` with the executed notebook, the figures/ and
    tables/ it wrote and `source.json` (the run that computed it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, analysis: AnalysisNotebook, key: str) -> Path:
        return self.root / f"{Path(analysis.executed_name).stem}-{key}"

    def copy_into(self, analysis: AnalysisNotebook, key: str, run_dir: Path) -> str | None:
        """The stored outputs for `key` copied into `run_dir`, the notebook's paths made the run's own; returns the
        run folder that computed them, or None when the store has none."""
        entry = self.entry(analysis, key)
        computed_in = (read_json_or_none(entry / SOURCE_FILE, dict) or {}).get("run_dir")
        if not isinstance(computed_in, str):  # none stored, or not whole: computed again
            return None
        for folder in OUTPUT_FOLDERS:
            for path in sorted((entry / folder).glob("*")) if (entry / folder).is_dir() else []:
                atomic_write_bytes(run_dir / folder / path.name, path.read_bytes())
        notebook = json.loads((entry / analysis.executed_name).read_text())
        notebook = _replaced(notebook, computed_in, str(run_dir.resolve()))
        notebook["cells"].insert(_after_parameters(notebook), _note_cell(computed_in))
        notebook["metadata"].setdefault("helpers", {})["analysis_computed_in"] = computed_in
        atomic_write_text(run_dir / "notebooks" / analysis.executed_name, json.dumps(notebook, indent=1) + "\n")
        return computed_in

    def add(self, analysis: AnalysisNotebook, key: str, run_dir: Path, written: list[Path]) -> None:
        """Store what the notebook wrote (`written`: its figures and tables) and the executed notebook, whole: into a
        temporary folder renamed into place (a run that stored the same first wins; this copy is dropped)."""
        entry = self.entry(analysis, key)
        if entry.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-{uuid.uuid4().hex[:8]}-", dir=self.root))
        try:
            for path in written:
                (staging / path.parent.name).mkdir(exist_ok=True)
                shutil.copy2(path, staging / path.parent.name / path.name)
            shutil.copy2(run_dir / "notebooks" / analysis.executed_name, staging / analysis.executed_name)
            write_json(staging / SOURCE_FILE, {"run_dir": str(run_dir.resolve()), "notebook": analysis.executed_name})
            staging.rename(entry)
        except OSError:
            if not entry.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _replaced(node, old: str, new: str):
    """The notebook with every mention of the run folder that computed it made this run's (its parameters, the
    hints that name the folder)."""
    if isinstance(node, str):
        return node.replace(old, new)
    if isinstance(node, list):
        return [_replaced(item, old, new) for item in node]
    if isinstance(node, dict):
        return {key: _replaced(value, old, new) for key, value in node.items()}
    return node


def _after_parameters(notebook: dict) -> int:
    """The position after papermill's injected parameters (else after the parameters cell, else the top)."""
    for tag in ("injected-parameters", "parameters"):
        for i, cell in enumerate(notebook["cells"]):
            if tag in cell.get("metadata", {}).get("tags", []):
                return i + 1
    return 0


def _note_cell(computed_in: str) -> dict:
    return {"cell_type": "markdown", "id": f"computed-in-{uuid.uuid4().hex[:8]}", "metadata": {"tags": ["helpers"]},
            "source": [f"*Computed once in the run `{computed_in}`, whose inputs to this notebook are this run's (the "
                       "same images, and the same settings where it reads them): its outputs, figures and tables are "
                       "copied here, not computed again.*"]}
