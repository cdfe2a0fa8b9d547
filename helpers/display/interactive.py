"""The notebooks' ipywidgets: a sharpening slider that shows what the factor (or, switched to one, a restoration)
does to the pixels a model sees, and prompt-group checkboxes that recompute from cached embeddings (a few small
matrix products: milliseconds).

In a saved run (`helpers.infra.progress.saved_run`: papermill, no live frontend) each widget is shown as what it would
show at its starting setting, a static picture or text, with a line saying to run the notebook live to change it.
"""

from __future__ import annotations

import functools
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import numpy as np
from IPython.display import Image as ImageOutput
from IPython.display import display
from PIL import Image, ImageDraw, ImageFont

from ..infra.progress import live_hint, saved_run, wrapped
from ..research.ablation import ModelEmbeddings
from ..research.scoring import SCORERS
from ..research.stats import accuracy_summary, interval_text
from ..research.steps import Step, apply_steps
from ..research.steps.standard import Sharpen
from .plots import detail_box, difference_image, model_input

SHARPENING = "sharpening"  # the slider's own mode; the others are restorations, by name


@dataclass(frozen=True)
class PreprocessingChange:
    """What a preprocessing setting (`label`: `sharpness 2.3`, a restoration) does to one model input: the signed
    change of every value (0-255 levels)."""

    label: str
    given: Image.Image  # the image as the model's preprocessing resizes it, before the setting's steps
    after: Image.Image  # the same after the setting's steps
    difference: np.ndarray  # int16, H x W x 3: after - given

    @property
    def mean(self) -> float:
        """Mean absolute change per value, in levels of 255."""
        return float(np.abs(self.difference).mean())

    @property
    def max(self) -> int:
        """Largest absolute change of any value, in levels of 255."""
        return int(np.abs(self.difference).max())

    @property
    def changed(self) -> float:
        """Fraction of the values that changed at all."""
        return float(np.count_nonzero(self.difference) / self.difference.size)


def step_change(image: Image.Image, label: str, steps: list[Step]) -> PreprocessingChange:
    """The change that `steps` make to an image (RGB, at the size the model sees)."""
    after = apply_steps(steps, image)
    difference = np.asarray(after, dtype=np.int16) - np.asarray(image, dtype=np.int16)
    return PreprocessingChange(label, image, after, difference)


def sharpening_change(image: Image.Image, factor: float) -> PreprocessingChange:
    """The change that `adjust_sharpness(factor)` makes to an image."""
    return step_change(image, f"sharpness {factor:g}", [Sharpen(factor)])


@functools.lru_cache
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def sharpness_panel(images: list[Image.Image], factor: float, crop: int = 112, zoom: int = 2,
                    gain: float = 32.0) -> tuple[bytes, list[PreprocessingChange]]:
    """`change_panel` of sharpening by `factor`."""
    return change_panel([sharpening_change(img, factor) for img in images], crop, zoom, gain)


def change_panel(changes: list[PreprocessingChange], crop: int = 112, zoom: int = 2,
                 gain: float = 32.0) -> tuple[bytes, list[PreprocessingChange]]:
    """PNG of what a setting does, one row per model input (`model_input`): the input at native size (the box marks
    the crop), the crop as given and changed at an integer zoom (nearest neighbour: every pixel a `zoom` x `zoom`
    block), and the change amplified `gain` times; with the change of each image."""
    images = [change.given for change in changes]
    size = max(img.width for img in images)
    tile, header, pad = crop * zoom, 22, 6
    titles = ["model input (box: crop)", f"crop x{zoom}, as given", f"crop x{zoom}, {changes[0].label}",
              f"change x{gain:g} (grey: none)"]
    widths = [size, tile, tile, tile]
    height = max(max(img.height for img in images), tile)
    panel = Image.new("RGB", (sum(widths) + pad * (len(widths) + 1), header + (height + pad) * len(images)), "white")
    draw = ImageDraw.Draw(panel)
    font = _font(13)
    xs = [pad + sum(widths[:i]) + pad * i for i in range(len(widths))]
    for x, title in zip(xs, titles):
        draw.text((x, 4), title, fill="black", font=font)
    for row, change in enumerate(changes):
        y = header + row * (height + pad)
        box = detail_box(change.given, crop)
        panel.paste(change.given, (xs[0], y))
        draw.rectangle((xs[0] + box[0], y + box[1], xs[0] + box[2] - 1, y + box[3] - 1), outline=(255, 40, 40))
        for x, img in zip(xs[1:], (change.given, change.after, difference_image(change.difference, gain))):
            panel.paste(img.crop(box).resize((tile, tile), Image.NEAREST), (x, y))
    buf = io.BytesIO()
    panel.save(buf, format="PNG", compress_level=1)  # a redraw's time is mostly the PNG encode
    return buf.getvalue(), changes


def change_lines(names: list[str], changes: list[PreprocessingChange]) -> list[str]:
    """One line per image: how much the setting changed it, in levels of 255."""
    return [f"{name}: {c.label} changes values by {c.mean:.2f} of 255 on average, at most {c.max} "
            f"({100 * c.changed:.0f}% of values change at all)" for name, c in zip(names, changes)]


def sharpness_slider(files: list[Path], size: int = 224, start: float = 2.3, crop: int = 112, zoom: int = 2,
                     gain: float = 32.0, restorations: dict[str, list[Step]] | None = None):
    """The model's input beside a crop of it as given and sharpened (at an integer zoom) and the amplified change,
    with the mean and largest change printed; the slider sets the factor, and the menu switches from sharpening to
    one of `restorations` (a name -> its steps) and back. (An Image widget, not an Output widget with a figure: it
    redraws faster and does not stall headless runs.) In a saved run: the picture at `start`."""
    images = [model_input(p, size) for p in files]

    def draw(mode: str, factor: float) -> tuple[bytes, str]:
        if mode == SHARPENING:
            changes = [sharpening_change(img, factor) for img in images]
        else:
            changes = [step_change(img, mode, restorations[mode]) for img in images]
        png, changes = change_panel(changes, crop, zoom, gain)
        return png, "\n".join(change_lines([p.name for p in files], changes))

    png, text = draw(SHARPENING, start)
    if saved_run():
        print(wrapped(text))
        display(ImageOutput(data=png))
        print(wrapped(f"Sharpness {start:g}. {live_hint('move the slider, or switch to a restoration')}"))
        return None
    width, height = Image.open(io.BytesIO(png)).size
    # at its own size in pixels: a VBox stretches its children to its width otherwise
    view = widgets.Image(value=png, format="png", layout=widgets.Layout(width=f"{width}px", height=f"{height}px"))
    lines = widgets.HTML(_pre(text))
    menu = widgets.Dropdown(options=[SHARPENING, *(restorations or {})], value=SHARPENING, description="shows",
                            layout=widgets.Layout(width="max-content"))
    slider = widgets.FloatSlider(value=start, min=0.0, max=5.0, step=0.1, description="sharpness",
                                 continuous_update=False)

    def redraw(_) -> None:
        slider.disabled = menu.value != SHARPENING  # a restoration has its own parameters, in its name
        view.value, text = draw(menu.value, slider.value)
        lines.value = _pre(text)

    slider.observe(redraw, names="value")
    menu.observe(redraw, names="value")
    box = widgets.VBox([menu, slider, lines, view], layout=widgets.Layout(align_items="flex-start"))
    display(box)
    return box


def _pre(text: str) -> str:
    return f"<pre style='margin: 0'>{html.escape(text)}</pre>"


def group_accuracy(emb: ModelEmbeddings, groups: list[str], mode: str, logit_scale: float = 100.0) -> dict:
    """Accuracy (with its interval) of one prompt-group selection and scoring mode, from cached embeddings."""
    idx = emb.prompts.group_indices(groups)
    if not emb.covers_every_class(idx):
        raise ValueError("every class needs at least one prompt in the chosen groups")
    return {**accuracy_summary(emb.labels, emb.predict(idx, mode, logit_scale)), "prompts": len(idx)}


def _accuracy_text(r: dict) -> str:
    return f"{interval_text(r['accuracy'], r['ci95'], 4)} on {r['images']} dev images, {r['prompts']} prompts"


def prompt_group_checkboxes(emb: ModelEmbeddings, logit_scale: float = 100.0, mode: str = "joint_softmax_mean"):
    """A checkbox per prompt group and a scoring-mode menu; the accuracy is recomputed on every change. In a saved
    run: the accuracy with every group, as text."""
    if saved_run():
        groups = list(emb.prompts.groups)
        print(wrapped(f"{emb.name}, every prompt group ({', '.join(groups)}), {mode}: "
                      f"{_accuracy_text(group_accuracy(emb, groups, mode, logit_scale))}"))
        print(wrapped(live_hint("tick prompt groups on and off and change the scoring mode")))
        return None
    boxes = [widgets.Checkbox(value=True, description=g, indent=False) for g in emb.prompts.groups]
    menu = widgets.Dropdown(options=SCORERS.names(), value=mode, description="scoring")
    result = widgets.HTML()

    def update(_=None) -> None:
        chosen = [b.description for b in boxes if b.value]
        started = time.perf_counter()
        try:
            r = group_accuracy(emb, chosen, menu.value, logit_scale)
        except ValueError as e:
            result.value = f"<b>{e}</b>"
            return
        ms = (time.perf_counter() - started) * 1000
        text = _accuracy_text(r)
        accuracy, rest = text.split(" ", 1)
        result.value = f"{html.escape(emb.name)}: <b>{accuracy}</b> {rest} ({ms:.0f} ms)"

    for w in [*boxes, menu]:
        w.observe(update, names="value")
    update()
    box = widgets.VBox([widgets.HBox(boxes), menu, result])
    display(box)
    return box
