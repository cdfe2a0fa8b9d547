"""`python -m helpers sweep CONFIG --grid KEY=V1,V2 ...`: the notebooks of a run config over a grid of settings,
each point a full `run` into its own run folder, all sharing one embedding cache, several at once on this machine or
as Slurm jobs; then a report of every point against the base config.

The sweep folder:

| path | what |
|---|---|
| `sweep.yaml` | the base config and the design's points (a rerun with another base config is refused) |
| `configs/<point>.yaml` | each point's run config, resolved: `python -m helpers run` it to rerun one point alone |
| `points/<point>/` | each point's run folder (executed notebooks, submission.csv, metrics.json, ...) |
| `status/<point>.json` | running, done or failed (with the notebook and cell), its seconds and images encoded |
| `logs/<point>.log` | what the point's run printed |
| `analyses/` | the analysis notebooks' outputs, each computed once and copied into the other points |
| `sweep.csv`, `sweep.json`, `figures/sweep.png` | the report (`helpers.runs.sweep.report`) |
| `submitit/` | with `--executor slurm` or `submitit-local`: the jobs' own logs |

Modules: `design` (the grid, the points, each checked), `launch` (a point's job, the launchers, the schedule,
reattaching), `scheduler` (the jobs as Slurm or submitit's local executor sees them), `report`.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...config import RunConfig, json_digest
from ...infra.errors import BelowMinimumAgreement, UserError
from ...infra.files import atomic_write_text, read_yaml_or_none
from .design import Design, Point, SweepError, design_points, make_design  # noqa: F401  the package's surface
from .launch import (
    EXECUTORS,
    LocalLauncher,
    PointJob,
    SlurmOptions,
    SubmititLauncher,
    dependencies,
    finished,
    live_jobs,
    run_points,
)
from .report import build_report, random_models, summary_table, write_report

FAILED_EXIT_STATUS = 4


class SweepFailed(UserError):
    """Some points failed (the others finished): the report names each, with its notebook and cell."""

    exit_status = FAILED_EXIT_STATUS


@dataclass
class SweepOptions:
    output_dir: str | Path | None = None
    jobs: int | None = None  # points at once (default: 1 here, all at once as submitit jobs)
    gpus: list[str] = field(default_factory=list)
    executor: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    analyses: bool = True
    progress: bool = True
    min_agreement: float | None = None


def default_sweep_dir(base: RunConfig) -> Path:
    """outputs/sweeps/<name>-<hash of the base config>: the same base sweeps (and resumes) into the same folder."""
    return Path("outputs") / "sweeps" / f"{base.name}-{json_digest(base.to_dict())[:8]}"


class Sweep:
    """A design's points and where they go."""

    def __init__(self, design: Design, points: list[Point], folder: Path):
        self.design, self.points, self.folder = design, points, Path(folder)

    def config_file(self, point: Point) -> Path:
        return self.folder / "configs" / f"{point.id}.yaml"

    def run_dir(self, point: Point) -> Path:
        return self.folder / "points" / point.id

    def status_file(self, point: Point) -> Path:
        return self.folder / "status" / f"{point.id}.json"

    def job(self, point: Point, analyses: bool, executor: str = "local") -> PointJob:
        """The point's job, its paths absolute: it may run in another folder or on another machine."""
        from ..history import default_index_path

        logs = self.folder.resolve() / "logs"
        return PointJob(point=point.id, config_file=str(self.config_file(point).resolve()),
                        run_dir=str(self.run_dir(point).resolve()), status_file=str(self.status_file(point).resolve()),
                        log_file=str(logs / f"{point.id}.log"), ledger_file=str(logs / f"{point.id}.encoded.jsonl"),
                        cwd=str(Path.cwd()), analyses=analyses, executor=executor,
                        analyses_store=str(self.folder.resolve() / "analyses"),
                        env={"HELPERS_RUN_INDEX": str(default_index_path().resolve())})

    def claim(self) -> None:
        """Record the base config and the points (a folder holds the sweeps of one base config), and write each
        point's config."""
        record = self.folder / "sweep.yaml"
        base = self.points[0].config.to_dict()
        recorded = read_yaml_or_none(record, dict)
        if recorded is not None and recorded.get("base") not in (None, base):
            raise SweepError(f"{self.folder} holds a sweep of another base config (its sweep.yaml); give another "
                             "--output-dir")
        self.folder.mkdir(parents=True, exist_ok=True)
        for point in self.points:
            atomic_write_text(self.config_file(point), yaml.safe_dump(point.config.to_dict(), sort_keys=False))
        atomic_write_text(record, yaml.safe_dump({
            "config": str(self.design.config_path), "set": self.design.overrides, "keys": self.design.keys,
            "points": [{"id": p.id, "settings": p.settings} for p in self.points], "base": base}, sort_keys=False))


def check_points(sweep: Sweep, here: bool) -> None:
    """Before anything runs: every point's folder is usable and its weights are there. `here`: the points run on
    this machine, so their device must be here too (a Slurm sweep may be started where the jobs' GPUs are not)."""
    import dataclasses

    from ..pipeline import check_device, check_models_once, check_paths

    checked = set()
    for point in sweep.points:
        check_paths(point.config, sweep.run_dir(point))
        if here:
            check_device(point.config)
        models = json_digest({n: dataclasses.asdict(m) for n, m in point.config.models.items()})
        if models not in checked:
            check_models_once(point.config)  # kept in the points' cache: they need not check again
            checked.add(models)


def build_dev_sets(points: list[Point], progress: bool) -> None:
    """The dev sets the points name and say how to build, built once here (not by two points at the same time)."""
    from ...research.data import read_classes
    from ...research.devset import build_missing_dev_set

    built = set()
    for point in points:
        dev, data = point.config.data.dev, point.config.data
        if dev is not None and dev.build is not None and dev.path not in built:
            build_missing_dev_set(dev, data.classes or read_classes(Path(data.test)), progress=progress)
            built.add(dev.path)


def make_launcher(options: SweepOptions, folder: Path):
    if options.executor == "local":
        return LocalLauncher(options.jobs or 1, options.gpus)
    return SubmititLauncher(options.executor, folder / "submitit", options.slurm, options.jobs)


def run_sweep(design: Design, options: SweepOptions, log=print) -> dict:
    """Run the design's points that have not finished, then write the report; returns the report's summary. Raises
    SweepFailed when some points failed (everything else written), BelowMinimumAgreement under
    `options.min_agreement`."""
    if options.executor not in EXECUTORS:
        raise SweepError(f"--executor is '{options.executor}', expected one of {', '.join(EXECUTORS)}")
    bad = [g for g in options.gpus if not (g.isascii() and g.isdigit())]
    if bad:
        raise SweepError(f"--gpus lists GPU indices (0,1,...), got '{bad[0]}'")
    if options.gpus and options.executor != "local":
        raise SweepError("--gpus shares this machine's GPUs out; with --executor slurm give --gpus-per-job")
    if options.gpus and options.jobs not in (None, len(options.gpus)):
        raise SweepError(f"--gpus runs one point per GPU at a time ({len(options.gpus)} at once): leave --jobs out")
    if options.executor == "slurm" and shutil.which("sbatch") is None:
        raise SweepError("--executor slurm submits with sbatch, which is not on PATH here: start the sweep where jobs "
                         "are submitted (a login node of the cluster), or use --executor submitit-local")
    points = design_points(design)
    if options.min_agreement is not None and points[0].config.reference is None:
        raise SweepError("--min-agreement needs a reference in the config (reference: winner-116, or --set "
                         "reference=PATH.csv)")
    folder = Path(options.output_dir) if options.output_dir else default_sweep_dir(points[0].config)
    sweep = Sweep(design, points, folder)
    check_points(sweep, here=options.executor == "local")
    sweep.claim()
    build_dev_sets(points, options.progress)
    from ...infra.jupyter import ensure_kernel

    ensure_kernel()  # registered once here, not by several points' runs at the same moment
    jobs = [sweep.job(p, options.analyses, options.executor) for p in points]
    done_before = {j.point for j in jobs if finished(j)}
    todo = [j for j in jobs if j.point not in done_before]
    live = live_jobs(todo, sweep.folder / "submitit")
    elsewhere = {point: job for point, job in live.items() if job[0] != options.executor}
    if elsewhere:
        executor = next(iter(elsewhere.values()))[0]
        listed = ", ".join(f"{point}: job {job_id}" for point, (_, job_id) in elsewhere.items())
        raise SweepError(f"{len(elsewhere)} point(s) still run as {executor} jobs of an earlier sweep ({listed}): "
                         f"rerun with --executor {executor} to wait for them, or end them first"
                         + (" (scancel JOB_ID)" if executor == "slurm" else ""))
    launcher = make_launcher(options, sweep.folder)
    attached = launcher.attach({point: job_id for point, (_, job_id) in live.items()}) if live else {}
    reattached = f"{len(attached)} running as jobs of an earlier sweep, reattached; " if attached else ""
    log(f"sweep {sweep.folder}: {len(points)} points ({len(done_before)} finished before, {reattached}"
        f"{len(todo) - len(attached)} to run), {launcher.describe()}")
    run_points(todo, dependencies(points, options.analyses), launcher, done_before, options.progress, attached)
    return report(sweep, options, log)


def report(sweep: Sweep, options: SweepOptions, log=print) -> dict:
    frame = build_report(sweep.points, sweep.design.keys, sweep.run_dir, sweep.status_file)
    failed = frame.loc[frame["status"] != "done", "point"].tolist()
    summary = {"sweep": str(sweep.folder), "config": str(sweep.design.config_path), "keys": sweep.design.keys,
               "base": sweep.points[0].id, "points_total": len(frame),
               "points_done": int((frame["status"] == "done").sum()), "points_failed": len(failed)}
    random = random_models(sweep.points)
    paths = write_report(sweep.folder, frame, summary, random)
    print(summary_table(frame, sweep.design.keys))
    for row in frame.itertuples():
        if row.status != "done":
            log(f"point {row.point} {row.status}: {row.error} (log: {row.log})")
    if random:
        log(f"note: RANDOM weights ({', '.join(random)}): the labels and accuracies are meaningless")
    log(f"report: {', '.join(str(p) for p in paths.values())}")
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(frame)} points failed ({', '.join(failed)}): each one's notebook and "
                          f"cell are in {paths['csv']}; rerun the same command to redo them")
    if options.min_agreement is not None:
        below = frame[frame["reference_agreement"] < options.min_agreement]
        if len(below):
            raise BelowMinimumAgreement(
                f"{len(below)} of {len(frame)} points agree with the reference below --min-agreement "
                f"{options.min_agreement} ({', '.join(below['point'])}); see {paths['csv']}")
    return {**summary, "report": {k: str(v) for k, v in paths.items()}}


def main_options(args) -> SweepOptions:
    return SweepOptions(output_dir=args.output_dir, jobs=args.jobs, gpus=[g for g in (args.gpus or "").split(",") if g],
                        executor=args.executor, analyses=not args.no_analyses, progress=not args.quiet,
                        min_agreement=args.min_agreement,
                        slurm=SlurmOptions(partition=args.partition, time_min=args.time, gpus_per_job=args.gpus_per_job,
                                           cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb, sbatch=args.sbatch))


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)
