"""Command line: `python -m helpers predict CONFIG.yaml --output-dir DIR`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data import DataError
from .models import WeightsUnavailableError
from .outputs import SubmissionError

USER_ERRORS = (ConfigError, DataError, WeightsUnavailableError, SubmissionError, FileNotFoundError)


def cmd_predict(args) -> None:
    from .pipeline import predict

    config = load_config(args.config, args.set)
    random = [n for n, m in config.models.items() if m.pretrained == "random"]
    if random:
        print(f"note: model(s) {', '.join(random)} use RANDOM weights (pretrained: random): "
              "their predictions are meaningless", file=sys.stderr)
    output_dir = Path(args.output_dir or Path("outputs") / "predict" / config.name)
    metrics = predict(config, output_dir, progress=not args.quiet)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {output_dir / 'submission.csv'}" if "test" in metrics else f"wrote {output_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="run every model and the ensemble; write submission.csv and the manifest")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--output-dir", help="where to write (default: outputs/predict/<name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.limit=64 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_predict)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
