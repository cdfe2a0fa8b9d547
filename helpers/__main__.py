"""Command line of the workbench.

    python -m helpers run CONFIG.yaml [--output-dir DIR]       the notebooks end to end (papermill): the main job
    python -m helpers predict CONFIG.yaml --output-dir DIR     the same computation in this process, no notebooks
    python -m helpers encode CONFIG.yaml                       every model's embeddings into the cache, no outputs
    python -m helpers compare RUN_A RUN_B                      how two runs (or submission.csv files) differ
    python -m helpers sweep CONFIG --grid KEY=V1,V2 [...]      the notebooks over a grid of settings, N at a time
    python -m helpers runs [--sweep DIR]                       the run history, latest first (one sweep's points)
    torchrun --nproc_per_node N -m helpers predict|encode ...  the same, the encodes shared by N processes
    python -m helpers estimate-blur DIR [--limit N]            blur statistics of a folder of images
    python -m helpers make-dev SRC --out DST --class-map ...   a labeled dev set degraded like the test set
    python -m helpers make-dev --config CONFIG                 the dev set a config says how to build
    python -m helpers download-data [--dest data]              the challenge's test images, to data/Scene
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .config import load_config
from .infra.env import env_flag
from .infra.errors import UserError, check_agreement, debug_mode, is_user_error, one_line, show_notes


def exit_with_parent() -> None:
    """A sweep's point ends with the sweep that started it (helpers.runs.sweep.launch.exit_with_parent)."""
    if env_flag("HELPERS_EXIT_WITH_PARENT"):
        from .runs.sweep.launch import exit_with_parent as set_up

        set_up()


def _world(config):
    """This process's rank under torchrun (one process without it)."""
    from .infra.distributed import init_world
    from .models import resolve_device

    return init_world(resolve_device(config.device))


def cmd_predict(args) -> None:
    config = load_config(args.config, args.set)  # first: a config's mistake is said before torch is imported
    if args.min_agreement is not None and config.reference is None:
        check_agreement({}, args.min_agreement, None)  # says what is missing, before any work
    from .runs.history import record_run
    from .runs.outputs import metrics_summary
    from .runs.pipeline import predict

    world = _world(config)
    random = config.random_weight_models()
    if random and world.is_main:
        print(f"note: model(s) {', '.join(random)} use RANDOM weights (pretrained: random): "
              "their predictions are meaningless", file=sys.stderr)
    output_dir = Path(args.output_dir or Path("outputs") / "predict" / config.name)
    started = time.perf_counter()
    metrics = predict(config, output_dir, progress=not args.quiet, world=world)
    if world.is_main:
        record_run(config, output_dir, metrics, time.perf_counter() - started, "predict", world.size)
        for line in metrics_summary(metrics):
            print(line)
        print(f"wrote {output_dir / 'submission.csv'}" if "test" in metrics else f"wrote {output_dir}",
              f"(every figure: {output_dir / 'metrics.json'})")
        check_agreement(metrics, args.min_agreement, output_dir)


def cmd_encode(args) -> None:
    config = load_config(args.config, args.set)
    from .runs.pipeline import encode_cache

    world = _world(config)
    encode_cache(config, progress=not args.quiet, world=world)
    if world.is_main:
        print(f"encoded every model's images and prompts into {config.cache_dir} ({world.size} process(es))")


def cmd_run(args) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("`run` under torchrun would run the whole pipeline once per process: run it alone, with "
                        "--nproc N for the encodes")
    config = load_config(args.config, args.set)
    if args.min_agreement is not None and config.reference is None:
        check_agreement({}, args.min_agreement, None)  # says what is missing, before any work
    from .runs.history import record_run
    from .runs.notebooks import run_pipeline, run_summary

    started = time.perf_counter()
    run_dir = run_pipeline(config, args.output_dir, analyses=not args.no_analyses, progress=not args.quiet,
                           log=lambda m: print(m, file=sys.stderr), nproc=args.nproc,
                           shared_analyses=args.shared_analyses)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record_run(config, run_dir, metrics, time.perf_counter() - started, "run", args.nproc)
    print(run_summary(run_dir))  # where the run is, what it wrote, how to compare it or open it
    check_agreement(metrics, args.min_agreement, run_dir)


def cmd_install_kernel(args) -> None:
    from .infra.jupyter import install_kernel

    print(f"installed the Jupyter kernel '{install_kernel()}' for {sys.executable} in {sys.prefix} (this checkout's "
          "environment)")


def cmd_download_data(args) -> None:
    from .infra.download import download_challenge_data

    print(f"challenge test set: {download_challenge_data(Path(args.dest), progress=not args.quiet)}")


def cmd_estimate_blur(args) -> None:
    from .research.data import require_usable
    from .research.devset import list_images, measure_blur, summarize_blur

    folder = Path(args.folder)
    files = list_images(folder, args.limit)
    require_usable(files, progress=not args.quiet)
    overall = measure_blur(files, progress=not args.quiet)
    groups = {"all": overall}
    subfolders = sorted({p.parent for p in files})
    if len(subfolders) > 1:  # each subfolder's statistics from the same per-image measurements
        for d in subfolders:
            rows = [i for i, p in enumerate(files) if p.parent == d]
            groups[str(d.relative_to(folder))] = summarize_blur([overall["sigmas"][i] for i in rows],
                                                                [overall["qualities"][i] for i in rows])
    print(f"{'set':<16}{'images':>8}{'median':>8}{'p10':>8}{'p90':>8}{'jpeg_q':>8}")
    for name, stats in groups.items():
        print(f"{name:<16}{stats['images']:>8}{stats['median']:>8.2f}{stats.get('p10', float('nan')):>8.2f}"
              f"{stats.get('p90', float('nan')):>8.2f}{str(stats['jpeg_quality']):>8}")
    if overall["measured"] < overall["images"]:
        print(f"note: {overall['images'] - overall['measured']} images too flat to measure", file=sys.stderr)
    print(f"sigma_px={overall['median']:.2f}")


def cmd_make_dev(args) -> None:
    from .research.data import DataError, read_classes
    from .research.devset import build_dev_set, list_images, match_test_blur, measure_blur, parse_class_map

    if args.config:
        make_dev_from_config(args)
        return
    if not (args.src and args.out):
        raise DataError("make-dev needs SRC and --out DST (or --config CONFIG, whose data.dev.build says how)")
    class_map = parse_class_map(args.class_map)
    if args.test:
        classes = read_classes(Path(args.test))
    elif args.sigma is not None and args.quality is not None:
        classes = list(dict.fromkeys(class_map.values())) if class_map else None
    else:
        raise DataError("make-dev needs --test DIR (to match its blur and read its classes.json), "
                        "or both --sigma and --quality")
    if classes is None:
        classes = sorted(p.name for p in Path(args.src).iterdir() if p.is_dir())
    provenance = {}
    sigma, quality = args.sigma, args.quality
    if sigma is None or quality is None:
        print(f"matching the blur of {args.test} ...", file=sys.stderr)
        matched = match_test_blur(list_images(args.src), Path(args.test), kernel_size=args.kernel_size,
                                  size=args.size)
        sigma = matched["sigma"] if sigma is None else sigma
        quality = matched["quality"] if quality is None else quality
        provenance["matched_to"] = {"test": str(args.test), **matched}
    info = build_dev_set(args.src, args.out, classes, class_map, sigma, quality, args.kernel_size, args.size,
                         provenance, progress=not args.quiet, limit_per_class=args.limit_per_class)
    dev_blur = measure_blur(list_images(args.out))["median"]
    print(json.dumps({k: v for k, v in info.items() if k != "ignored_non_images"}, indent=2))
    if info["ignored_non_images"]:
        print(f"ignored {len(info['ignored_non_images'])} non-image files, e.g. {info['ignored_non_images'][0]}",
              file=sys.stderr)
    print(f"wrote {info['images']} images to {args.out}; estimated blur of the dev set: sigma_px={dev_blur:.2f}")


def make_dev_from_config(args) -> None:
    """`make-dev --config CONFIG`: build the config's dev folder as its data.dev.build says, if it is not there."""
    from .research.data import DataError, read_classes
    from .research.devset import build_missing_dev_set

    config = load_config(args.config, args.set)
    dev = config.data.dev
    if dev is None or dev.build is None:
        raise DataError(f"{args.config}: no data.dev.build says how to build the dev set (give SRC and --out instead)")
    classes = config.data.classes or read_classes(Path(config.data.test))
    built = build_missing_dev_set(dev, classes, progress=not args.quiet)
    print(f"{'built' if built else 'already there:'} {dev.path}")


# helpers.runs.sweep.launch.EXECUTORS, not imported from there: --help stays quick
EXECUTOR_CHOICES = ("local", "slurm", "submitit-local")
SWEEP_HELP = """Each point of the grid is a full `run` (every notebook) of the base config with the point's settings,
into DIR/points/<point>/, all sharing the config's embedding cache: a point that changes only prompts, scoring or the
ensemble encodes no image, and an analysis notebook runs once for the points that share what it reads (DIR/analyses/).
A rerun skips the points that finished, reattaches to the jobs (slurm, submitit-local) of an earlier sweep that still
run, and redoes the others. The report: DIR/sweep.csv, DIR/sweep.json, DIR/figures/sweep.png.

exit status: 0 every point finished; 2 bad input (nothing ran); 3 a point below --min-agreement; 4 some points
failed (the last line says how many; the report names each one's notebook and cell).

examples:
  python -m helpers sweep configs/demo.yaml --grid models.metaclip.sharpness=2.3,1.0 --jobs 2
  python -m helpers sweep configs/winner.yaml --grid scoring=joint_softmax_mean,mean_logit --gpus 0,1
  python -m helpers sweep configs/sweeps/demo.yaml --executor slurm --partition gpu --gpus-per-job 1 --time 120
"""
MIN_AGREEMENT_HELP = ("for scheduled runs: exit with status 3, after writing everything, when the test set's "
                      "agreement with the config's reference is below X (0..1)")


def cmd_compare(args) -> None:
    from .runs.compare import compare_runs, parse_names, summary_lines

    result = compare_runs(args.a, args.b, args.output_dir, parse_names(args.names))
    for line in summary_lines(result):
        print(line)
    print(json.dumps(result))  # the last line: one JSON object


def cmd_sweep(args) -> None:
    from .runs.sweep import log_to_stderr, main_options, make_design, run_sweep

    design = make_design(args.config, args.set, args.grid, args.zip)
    run_sweep(design, main_options(args), log=log_to_stderr)


def cmd_runs(args) -> None:
    from .runs.history import default_index_path, format_history, read_history, runs_under

    index = Path(args.index) if args.index else default_index_path()
    history = read_history(index)
    if args.sweep:
        history = runs_under(history, Path(args.sweep))
        if history.empty:
            print(f"no runs of the sweep {args.sweep} in {index}")
            return
    if history.empty:
        print(f"no runs recorded yet in {index} (every run and predict adds one)")
        return
    print(format_history(history, args.limit))


def _leave_process_group() -> None:
    """Leave torch's process group if this command joined one (torch warns about one left open)."""
    if "torch.distributed" in sys.modules:  # else never imported, never joined: no need to import torch for it
        from .infra.distributed import leave_process_group

        leave_process_group()


def bounded(kind, low=None, high=None):
    """An argparse type: a number of `kind` in [low, high] (finite), with the range in the error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (notebooks too)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", parents=[common],
                       help="execute the notebooks end to end with papermill into a run folder")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--output-dir", help="the run folder (default: outputs/runs/<name>-<config hash>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-analyses", action="store_true", help="only inference and ensemble")
    p.add_argument("--shared-analyses", metavar="DIR",
                   help="copy an analysis notebook's outputs from DIR where another run computed them for the same "
                   "inputs, and add those computed here (a sweep passes its analyses/ folder)")
    p.add_argument("--min-agreement", type=bounded(float, 0, 1), metavar="X", help=MIN_AGREEMENT_HELP)
    p.add_argument("--nproc", type=bounded(int, 1, 1024), default=1,
                   help="encode with N processes under torchrun first (one per GPU; gloo on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("install-kernel", parents=[common],
                       help="register this interpreter as the notebooks' Jupyter kernel")
    p.set_defaults(func=cmd_install_kernel)

    p = sub.add_parser("predict", parents=[common],
                       help="run every model and the ensemble; write submission.csv and the manifest")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--output-dir", help="where to write (default: outputs/predict/<name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.limit=64 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--min-agreement", type=bounded(float, 0, 1), metavar="X", help=MIN_AGREEMENT_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("encode", parents=[common],
                       help="every model's embeddings into the cache, no outputs (several processes: under torchrun)")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("download-data", parents=[common],
                       help="download the challenge data (HF dataset sw24/sw24) to DEST/Scene")
    p.add_argument("--dest", default="data", help="receives Scene/ and data.zip.sha256 (default: data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download_data)

    p = sub.add_parser("estimate-blur", parents=[common],
                       help="estimated Gaussian blur (sigma, px) of a folder of images")
    p.add_argument("folder")
    p.add_argument("--limit", type=bounded(int, 1), help="only the first N images in natural order")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_estimate_blur)

    p = sub.add_parser("make-dev", parents=[common],
                       help="degrade a labeled ImageFolder like the challenge's test set")
    p.add_argument("src", nargs="?", help="labeled ImageFolder: SRC/<class folder>/<image>")
    p.add_argument("--out", help="where to write the dev set (must not exist)")
    p.add_argument("--config", help="instead of SRC and --out: build this run config's data.dev as its data.dev.build "
                   "says, if it is not there yet (configs/demo.yaml: make dev-demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: override a key")
    p.add_argument("--class-map", help="folder=Class,... or a YAML file; default: folders are class names")
    p.add_argument("--test", help="the challenge test folder: its classes.json, blur and JPEG quality are matched")
    p.add_argument("--sigma", type=bounded(float, 0, 100),
                   help="Gaussian sigma in px at --size (default: matched to --test)")
    p.add_argument("--quality", type=bounded(int, 0, 100), help="JPEG quality (default: read from the --test files)")
    p.add_argument("--kernel-size", type=bounded(int, 1, 1001),
                   help="blur kernel size (default: the full Gaussian, 4 sigma)")
    p.add_argument("--size", type=bounded(int, 8, 4096), default=224)
    p.add_argument("--limit-per-class", type=bounded(int, 1),
                   help="only the first N images of each class, in natural order (a small dev set, e.g. the demo's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_make_dev)

    p = sub.add_parser("compare", parents=[common],
                       help="label agreement of two runs (or submission.csv files) on the test set, image by image")
    p.add_argument("a", help="run folder (of run or predict) or submission.csv: A")
    p.add_argument("b", help="run folder or submission.csv: B")
    p.add_argument("--output-dir", help="where to write tables/ and figures/ (default: outputs/compare/<A>-vs-<B>)")
    p.add_argument("--names", metavar="NAME_A,NAME_B", help="what to call A and B (default: their folder names)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="run the notebooks over a grid of settings (each point a run), then report every point",
                       description=SWEEP_HELP)
    p.add_argument("config", help="the base run config (YAML), or a sweep file (config:, grid:, zip:, points:)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values (read as a YAML list); several: their product (repeatable)")
    p.add_argument("--zip", action="store_true", help="pair the --grid lists (equal lengths) instead of their product")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the base config")
    p.add_argument("--output-dir", help="the sweep folder (default: outputs/sweeps/<name>-<base config hash>)")
    p.add_argument("--jobs", type=bounded(int, 1, 1024),
                   help="points run at once (default: 1 on this machine; every point at once as Slurm jobs)")
    p.add_argument("--gpus", metavar="0,1,...", help="one point per GPU at a time, each run seeing only its GPU")
    p.add_argument("--executor", choices=EXECUTOR_CHOICES, default="local",
                   help="local (default): on this machine; slurm: each point a Slurm job (submitit); submitit-local: "
                   "the Slurm path on this machine (submitit's local executor)")
    p.add_argument("--partition", help="slurm: the partition")
    p.add_argument("--time", type=bounded(int, 1), default=240, metavar="MINUTES", help="slurm: each job's time limit")
    p.add_argument("--gpus-per-job", type=bounded(int, 0, 64), help="slurm: GPUs per point")
    p.add_argument("--cpus-per-job", type=bounded(int, 1, 1024), help="slurm: CPUs per point")
    p.add_argument("--mem-gb", type=bounded(float, 0.1), help="slurm: memory per point, GB")
    p.add_argument("--sbatch", action="append", default=[], metavar="FLAGS",
                   help="slurm: more sbatch options, e.g. --sbatch='--account=lab --qos=high' (repeatable)")
    p.add_argument("--no-analyses", action="store_true", help="each point: only inference and ensemble")
    p.add_argument("--min-agreement", type=bounded(float, 0, 1), metavar="X",
                   help="exit with status 3 when a point's agreement with the reference is below X (0..1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("runs", parents=[common], help="the run history (outputs/runs/index.csv), latest first")
    p.add_argument("--index", help="the history file (default: outputs/runs/index.csv, or $HELPERS_RUN_INDEX)")
    p.add_argument("--sweep", metavar="DIR", help="only the points of the sweep in DIR")
    p.add_argument("--limit", type=bounded(int, 1), help="only the latest N runs")
    p.set_defaults(func=cmd_runs)
    args = parser.parse_args(argv)
    exit_with_parent()
    show_notes("stderr")
    try:
        with debug_mode(args.debug):
            try:
                args.func(args)
            finally:
                _leave_process_group()
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted: what was finished is kept (the embedding cache resumes where it stopped)",
              file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_status if isinstance(e, UserError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
