"""Figures of the notebooks (matplotlib), each also saved as a PNG so that a run can be read without Jupyter."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from ..infra.files import atomic_write_bytes, atomic_write_csv
from ..research.data import open_image
from ..research.steps import apply_steps
from ..research.steps.standard import Sharpen


def save_figure(fig, output_dir: str | Path, name: str, random_weights: Sequence[str] = ()) -> Path:
    """The figure as `<output_dir>/figures/<name>.png`; the models with random weights, if any, are named under it,
    in the figure as shown too (its numbers mean nothing). A notebook saves through its `nb.RunFolder`."""
    models = list(random_weights)
    if models:
        # below everything else (the tight bounding box grows to take it in)
        fig.text(0.01, -0.04, f"random weights ({', '.join(models)}): these numbers mean nothing", fontsize=8,
                 color="#b00020", ha="left", va="top")
    path = Path(output_dir) / "figures" / f"{name}.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_table(table: pd.DataFrame, output_dir: str | Path, name: str, random_weights: Sequence[str] = ()) -> Path:
    """The table as `<output_dir>/tables/<name>.csv`, with a `random_weights` column naming the models with random
    weights when there are any."""
    models = list(random_weights)
    if models:
        table = table.assign(random_weights=", ".join(models))
    path = Path(output_dir) / "tables" / f"{name}.csv"
    atomic_write_csv(path, table, index=False)
    return path


def model_input(path: Path, size: int = 224) -> Image.Image:
    """The image as the preprocessing gives it to the steps after the head: squash-resized (bicubic) to size x size,
    RGB (`helpers.research.steps.Preprocess`)."""
    return open_image(path).resize((size, size), Image.BICUBIC).convert("RGB")


def detail_box(image: Image.Image, crop: int) -> tuple[int, int, int, int]:
    """The crop x crop window with the most edges (summed gradient magnitude, on an 8-pixel grid): where sharpening
    and restoration change most, whatever the setting, so the window stays put while it changes."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    edges = np.zeros_like(gray)
    edges[:, 1:] += np.abs(np.diff(gray, axis=1))
    edges[1:, :] += np.abs(np.diff(gray, axis=0))
    integral = np.pad(edges.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = gray.shape
    crop = min(crop, h, w)
    best, box = -1.0, (0, 0)
    for y in list(range(0, h - crop + 1, 8)) + [h - crop]:
        for x in list(range(0, w - crop + 1, 8)) + [w - crop]:
            total = integral[y + crop, x + crop] - integral[y, x + crop] - integral[y + crop, x] + integral[y, x]
            if total > best:
                best, box = total, (x, y)
    return box[0], box[1], box[0] + crop, box[1] + crop


def difference_image(difference: np.ndarray, gain: float) -> Image.Image:
    """The signed change, averaged over the channels and amplified: mid-grey is unchanged, lighter is brighter after
    the change, darker is darker; `gain` levels of grey per level of change (clipped)."""
    signed = difference.astype(np.float64).mean(axis=2)
    return Image.fromarray(np.clip(128 + gain * signed, 0, 255).round().astype(np.uint8), "L").convert("RGB")


def restoration_gallery(files: list[Path], settings: dict[str, list], crop: int = 96, gain: float = 8.0):
    """The same crop of each image (its most detailed, `detail_box`) under every setting (a name -> its steps after
    the resize: sharpening factors and restorations side by side; [] is the image as given), and under each, the
    change from the image as given, amplified `gain` times (mid-grey: none)."""
    names = list(settings)
    fig, axes = plt.subplots(2 * len(files), len(names), figsize=(1.9 * len(names), 3.9 * len(files)),
                             squeeze=False)
    for row, path in enumerate(files):
        image = model_input(path)
        box = detail_box(image, crop)
        given = np.asarray(image.crop(box), dtype=np.int16)
        for col, name in enumerate(names):
            changed = apply_steps(settings[name], image).crop(box)
            axes[2 * row, col].imshow(changed)
            axes[2 * row + 1, col].imshow(difference_image(np.asarray(changed, dtype=np.int16) - given, gain))
            axes[2 * row, col].set_title(textwrap.fill(name, 22), fontsize=7)
        axes[2 * row, 0].set_ylabel(path.name, fontsize=8)
        axes[2 * row + 1, 0].set_ylabel(f"change x{gain:g}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def sharpening_gallery(files: list[Path], factors: list[float], size: int = 224):
    """Each row one test image, each column a sharpening factor (1.0: the image as given)."""
    fig, axes = plt.subplots(len(files), len(factors), figsize=(2.2 * len(factors), 2.2 * len(files)), squeeze=False)
    for row, path in zip(axes, files):
        img = model_input(path, size)
        for ax, factor in zip(row, factors):
            ax.imshow(Sharpen(factor)(img) if factor != 1.0 else img)
            ax.set_xticks([]), ax.set_yticks([])
        row[0].set_ylabel(path.name, fontsize=8)
    for ax, factor in zip(axes[0], factors):
        ax.set_title(f"sharpness {factor:g}", fontsize=9)
    fig.tight_layout()
    return fig


def blur_histograms(sigmas: dict[str, list[float]]):
    """Estimated blur (sigma, px) of each set, overlaid."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    values = [np.asarray(v, dtype=float) for v in sigmas.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    bins = np.linspace(finite.min(), finite.max(), 40) if finite.size else 10
    for name, v in zip(sigmas, values):
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{name} (median {np.median(v):.2f} px, n={v.size})")
    ax.set_xlabel("estimated Gaussian blur sigma (px at 224)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return fig


def variant_chart(table: pd.DataFrame, title: str, label: str = "variant"):
    """Accuracy of each variant with its 95% interval; the reference in black, variants that differ from it beyond
    chance (Holm-adjusted McNemar) in red, the rest in grey."""
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(table) + 1.2))
    y = np.arange(len(table))[::-1]
    colors = ["black" if r else ("tab:red" if d else "tab:gray") for r, d in zip(table["reference"], table["differs"])]
    for yi, color, (_, row) in zip(y, colors, table.iterrows()):
        err = [[row["accuracy"] - row["accuracy_ci_low"]], [row["accuracy_ci_high"] - row["accuracy"]]]
        ax.errorbar([row["accuracy"]], [yi], xerr=err, fmt="o", color=color, capsize=3)
    ax.set_yticks(y, table[label].astype(str))
    ax.set_xlabel("accuracy (95% bootstrap interval)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def sharpness_curve(table: pd.DataFrame):
    """Accuracy against the sharpening factor, one line per model, with 95% interval bands; multi-factor
    (test-time view) variants as separate points at the right."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for model, rows in table.groupby("model", sort=False):
        single = rows[~rows["variant"].str.contains(r"\+")]
        x = single["variant"].astype(float)
        line = ax.plot(x, single["accuracy"], marker="o", label=model)[0]
        ax.fill_between(x, single["accuracy_ci_low"], single["accuracy_ci_high"], alpha=0.15, color=line.get_color())
        for i, (_, r) in enumerate(rows[rows["variant"].str.contains(r"\+")].iterrows()):
            xv = x.max() + 0.3 * (i + 1)
            ax.errorbar([xv], [r["accuracy"]], yerr=[[r["accuracy"] - r["accuracy_ci_low"]],
                                                     [r["accuracy_ci_high"] - r["accuracy"]]],
                        fmt="s", color=line.get_color(), capsize=3)
            ax.annotate(r["variant"], (xv, r["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("sharpening factor (adjust_sharpness)")
    ax.set_ylabel("dev accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def preprocessing_chart(table: pd.DataFrame):
    """`ablation.preprocessing_ablation`'s tables in one figure, a panel per model: each setting's accuracy with its
    95% interval, sharpening factors as circles and restorations as squares; the configured preprocessing in black,
    settings that differ from it beyond chance (paired, Holm-adjusted McNemar) in red, the rest in grey."""
    models = list(dict.fromkeys(table["model"]))
    variants = list(dict.fromkeys(table["variant"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models) + 2.6, 0.32 * len(variants) + 1.4),
                             sharey=True, squeeze=False)
    y = {v: len(variants) - 1 - i for i, v in enumerate(variants)}
    markers = {"sharpening": "o", "restoration": "s", "configured": "D"}
    for ax, model in zip(axes[0], models):
        for _, row in table[table["model"] == model].iterrows():
            color = "black" if row["reference"] else ("tab:red" if row["differs"] else "tab:gray")
            err = [[row["accuracy"] - row["accuracy_ci_low"]], [row["accuracy_ci_high"] - row["accuracy"]]]
            ax.errorbar([row["accuracy"]], [y[row["variant"]]], xerr=err, fmt=markers[row["kind"]], color=color,
                        capsize=3)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("dev accuracy (95% interval)")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(list(y.values()), [textwrap.fill(v, 40) for v in y], fontsize=7)
    fig.tight_layout()
    return fig


def confusion_chart(matrix, classes: list[str], title: str):
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return fig


def class_counts_chart(counts: dict[str, int], title: str):
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.bar(list(counts), list(counts.values()), color="tab:blue")
    for i, v in enumerate(counts.values()):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15 * max(max(counts.values()), 1))  # room above the tallest bar for its count
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    return fig
