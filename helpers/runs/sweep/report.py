"""A sweep's report: per point its settings, status, wall time, images encoded, dev accuracy with its 95% interval
and the paired test against the base, agreement with the reference submission and with the base's run.

Written into the sweep folder: `sweep.csv` (a row per point, every figure), `sweep.json` (the same, each interval as
`<name>_ci95: [low, high]`, and the sweep's counts) and `figures/sweep.png` (dev accuracy, or agreement without a dev
set, point by point, base first).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ...infra.files import atomic_write_csv, atomic_write_text, read_json_or_none
from ...research.stats import interval_columns, interval_records, interval_text, label_agreement
from ..compare import CompareError, aligned_labels, compare_dev, load_side
from .design import Point, setting_of, shown
from .launch import read_status


def _interval(prefix: str, summary: dict | None, value_key: str, ci_key: str = "ci95") -> dict:
    if not summary:
        return interval_columns(prefix, math.nan, None)
    return interval_columns(prefix, summary[value_key], summary[ci_key])


def point_row(point: Point, keys: list[str], status: dict, run_dir: Path, base_side, base_id: str) -> dict:
    """One point's row of the report (its figures from its own metrics.json; against the base from both runs)."""
    row = {"point": point.id, "base": point.id == base_id}
    # as the grid gives it (`{set: winner, exclude: [...]}`), else as the point's config has it (the base)
    row.update({key: shown(point.settings[key] if key in point.settings else setting_of(point.config, key))
                for key in keys})
    row.update(status=status.get("status", "not run"), seconds=status.get("seconds", math.nan),
               images_encoded=status.get("images_encoded", math.nan))
    metrics = (read_json_or_none(run_dir / "metrics.json", dict) or {}) if row["status"] == "done" else {}
    row.update(_interval("dev_accuracy", metrics.get("dev", {}).get("ensemble"), "accuracy"))
    row.update(_interval("reference_agreement", metrics.get("test", {}).get("reference"), "agreement"))
    if metrics and base_side is not None and point.id != base_id:
        row.update(_against_base(run_dir, base_side))
    row.update(error=status.get("error") or "", run_folder=str(run_dir), log=status.get("log", ""))
    return row


def _against_base(run_dir: Path, base_side) -> dict:
    """Agreement with the base's labels on the test set, and the paired dev test of this point against the base."""
    try:
        side = load_side(run_dir, "point", "B")
        _, labels_base, labels = aligned_labels(base_side, side)
    except CompareError:
        return {}
    row = _interval("base_agreement", label_agreement(labels_base, labels), "agreement")
    dev, _ = compare_dev(base_side, side)
    if dev is not None:
        d = dev["b_minus_a"]
        row.update(interval_columns("dev_delta_vs_base", d["delta"], d["delta_ci95"]), dev_mcnemar_p=d["mcnemar_p"],
                   dev_differs=d["differs"])
    return row


COLUMNS_AFTER_SETTINGS = [
    "status", "seconds", "images_encoded", "dev_accuracy", "dev_accuracy_ci_low", "dev_accuracy_ci_high",
    "dev_delta_vs_base", "dev_delta_vs_base_ci_low", "dev_delta_vs_base_ci_high", "dev_mcnemar_p", "dev_differs",
    "reference_agreement", "reference_agreement_ci_low", "reference_agreement_ci_high", "base_agreement",
    "base_agreement_ci_low", "base_agreement_ci_high", "error", "run_folder", "log"]


def build_report(points: list[Point], keys: list[str], run_dir_of, status_file_of) -> pd.DataFrame:
    """The report's table: one row per point, in the design's order (the base first)."""
    base = points[0]
    base_status = read_status(status_file_of(base))
    base_side = None
    if base_status.get("status") == "done":
        try:
            base_side = load_side(run_dir_of(base), "base", "A")
        except CompareError:
            base_side = None
    rows = [point_row(p, keys, read_status(status_file_of(p)), run_dir_of(p), base_side, base.id) for p in points]
    frame = pd.DataFrame(rows)
    for column in COLUMNS_AFTER_SETTINGS:
        if column not in frame.columns:
            frame[column] = math.nan
    return frame[["point", "base", *keys, *COLUMNS_AFTER_SETTINGS]]


def random_models(points: list[Point]) -> list[str]:
    return sorted({name for p in points for name in p.config.random_weight_models()})


def write_report(sweep_dir: Path, frame: pd.DataFrame, summary: dict, random: list[str]) -> dict[str, Path]:
    """sweep.csv, sweep.json and the figure; returns their paths."""
    from ...display.plots import save_figure

    paths = {"csv": sweep_dir / "sweep.csv", "json": sweep_dir / "sweep.json"}
    atomic_write_csv(paths["csv"], frame.assign(random_weights=", ".join(random)) if random else frame, index=False)
    records = interval_records(json.loads(frame.to_json(orient="records")))  # NaN -> null; intervals as ci95 pairs
    atomic_write_text(paths["json"], json.dumps({**summary, "random_weights": random, "points": records},
                                                indent=2) + "\n")
    fig = sweep_chart(frame, summary["keys"])
    if fig is not None:
        import matplotlib.pyplot as plt

        written = save_figure(fig, sweep_dir, "sweep", random)
        plt.close(fig)
        paths["figure"] = written
    return paths


def sweep_chart(frame: pd.DataFrame, keys: list[str]):
    """Each point's dev accuracy with its 95% interval (without a dev set: its agreement with the reference, else
    with the base), the base's as a dashed line; failed points named as such."""
    import matplotlib.pyplot as plt

    figures = [(column, label) for column, label in (
        ("dev_accuracy", "dev accuracy (95% CI)"), ("reference_agreement", "agreement with the reference (95% CI)"),
        ("base_agreement", "agreement with the base's labels (95% CI)")) if frame[column].notna().any()]
    if not figures:
        return None
    column, label = figures[0]
    rows = frame.iloc[::-1]  # the base at the top
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    y = range(len(rows))
    values = rows[column].to_numpy(dtype=float)
    low = values - rows[f"{column}_ci_low"].to_numpy(dtype=float)
    high = rows[f"{column}_ci_high"].to_numpy(dtype=float) - values
    ax.errorbar(values, y, xerr=[low, high], fmt="o", color="#1f77b4", capsize=3)
    base = frame.loc[frame["base"], column]
    if len(base) and pd.notna(base.iloc[0]):
        ax.axvline(base.iloc[0], color="#555555", linestyle="--", linewidth=1, label="base")
        ax.legend(loc="lower right", fontsize=8)
    for i, status in enumerate(rows["status"]):
        if status != "done":
            ax.annotate(status, (0.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=8,
                        color="#b00020")
    ax.set_yticks(list(y), [point_label(row, keys) for _, row in rows.iterrows()], fontsize=8)
    ax.set_xlabel(label)
    ax.set_title(f"sweep: {len(frame)} points", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def point_label(row, keys: list[str]) -> str:
    """A point as its settings say it (short keys), the base as "base"."""
    if row["base"]:
        return "base"
    return ", ".join(f"{key.removeprefix('models.')}={row[key]}" for key in keys)


def summary_table(frame: pd.DataFrame, keys: list[str]) -> str:
    """The report for a terminal: per point its settings, status, time, images encoded and main figures."""
    def interval(column: str, digits: int = 3):
        def cell(row) -> str:
            value = row[column]
            if pd.isna(value):
                return "-"
            return interval_text(value, (row[f"{column}_ci_low"], row[f"{column}_ci_high"]), digits)
        return cell

    shown = pd.DataFrame({key.removeprefix("models."): frame[key] for key in keys})
    shown["status"] = frame["status"]
    shown["s"] = frame["seconds"].map(lambda v: "-" if pd.isna(v) else f"{v:.0f}")
    shown["encoded"] = frame["images_encoded"].map(lambda v: "-" if pd.isna(v) else f"{v:.0f}")
    shown["dev acc [95% CI]"] = frame.apply(interval("dev_accuracy"), axis=1)
    shown["Δ base (p)"] = [("-" if pd.isna(d) else f"{d:+.3f} ({p:.2g})") for d, p in
                           zip(frame["dev_delta_vs_base"], frame["dev_mcnemar_p"])]
    shown["agree ref"] = frame["reference_agreement"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}")
    shown["agree base"] = frame["base_agreement"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}")
    shown["point"] = frame["point"].where(~frame["base"], frame["point"] + " (base)")
    return shown.to_string(index=False)
