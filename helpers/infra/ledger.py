"""The encode ledger: when $HELPERS_ENCODE_LEDGER names a file, every image encode appends a line to it (which model,
which store, how many images it computed), so that whoever started a run (a sweep's point) knows how many images it
encoded, across the run's notebooks and processes, without importing torch to read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENCODE_LEDGER_ENV = "HELPERS_ENCODE_LEDGER"


def record_encode(model: str, store: str, images: int) -> None:
    """A line in the ledger, when there is one and something was encoded."""
    ledger = os.environ.get(ENCODE_LEDGER_ENV)
    if ledger and images:
        line = json.dumps({"model": model, "store": store, "images": images, "pid": os.getpid()}) + "\n"
        with open(ledger, "a") as f:  # one short line in append mode: the ranks of a torchrun never interleave
            f.write(line)


def images_encoded(ledger: str | Path) -> int:
    """The images the encodes recorded in `ledger` computed (a line cut short by a killed run is left out)."""
    try:
        lines = Path(ledger).read_text().splitlines()
    except OSError:
        return 0
    total = 0
    for line in lines:
        try:
            total += int(json.loads(line)["images"])
        except (ValueError, KeyError, TypeError):
            continue
    return total
