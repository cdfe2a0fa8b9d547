"""The notebooks' ipywidgets: a sharpening slider, and prompt-group checkboxes that recompute from cached
embeddings (a few small matrix products: milliseconds)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import ipywidgets as widgets
from IPython.display import display
from PIL import Image

from .ablation import ModelEmbeddings
from .data import Sharpen
from .scoring import SCORERS
from .stats import accuracy_summary


def sharpness_strip(files: list[Path], factor: float, size: int = 224) -> bytes:
    """PNG of the images as given (left) beside their sharpened versions (right), one row per image."""
    strip = Image.new("RGB", (2 * size, size * len(files)), "white")
    for row, path in enumerate(files):
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        strip.paste(img, (0, row * size))
        strip.paste(Sharpen(factor)(img), (size, row * size))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()


def sharpness_slider(files: list[Path], size: int = 224, start: float = 2.3):
    """The images as given beside their sharpened versions; the slider sets the factor. (An Image widget, not an
    Output widget with a figure: it redraws faster and does not stall headless papermill runs.)"""
    view = widgets.Image(value=sharpness_strip(files, start, size), format="png")
    slider = widgets.FloatSlider(value=start, min=0.0, max=5.0, step=0.1, description="sharpness",
                                 continuous_update=False)
    slider.observe(lambda change: setattr(view, "value", sharpness_strip(files, change["new"], size)),
                   names="value")
    box = widgets.VBox([slider, view])
    display(box)
    return box


def group_accuracy(emb: ModelEmbeddings, groups: list[str], mode: str, logit_scale: float = 100.0) -> dict:
    """Accuracy (with its interval) of one prompt-group selection and scoring mode, from cached embeddings."""
    idx = emb.prompts.group_indices(groups)
    if not emb.covers_every_class(idx):
        raise ValueError("every class needs at least one prompt in the chosen groups")
    return {**accuracy_summary(emb.labels, emb.predict(idx, mode, logit_scale)), "prompts": len(idx)}


def prompt_group_checkboxes(emb: ModelEmbeddings, logit_scale: float = 100.0):
    """A checkbox per prompt group and a scoring-mode menu; the accuracy is recomputed on every change."""
    boxes = [widgets.Checkbox(value=True, description=g, indent=False) for g in emb.prompts.groups]
    mode = widgets.Dropdown(options=list(SCORERS), value="joint_softmax_mean", description="scoring")
    result = widgets.HTML()

    def update(_=None) -> None:
        chosen = [b.description for b in boxes if b.value]
        started = time.perf_counter()
        try:
            r = group_accuracy(emb, chosen, mode.value, logit_scale)
        except ValueError as e:
            result.value = f"<b>{e}</b>"
            return
        ms = (time.perf_counter() - started) * 1000
        result.value = (f"<b>{r['accuracy']:.4f}</b> [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] on {r['images']} dev "
                        f"images, {r['prompts']} prompts ({ms:.0f} ms)")

    for w in [*boxes, mode]:
        w.observe(update, names="value")
    update()
    box = widgets.VBox([widgets.HBox(boxes), mode, result])
    display(box)
    return box
