"""The notebooks' widgets: what they show and that they recompute from the cache."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from helpers.display.interactive import (
    change_lines,
    change_panel,
    detail_box,
    difference_image,
    group_accuracy,
    model_input,
    prompt_group_checkboxes,
    sharpening_change,
    sharpness_panel,
    sharpness_slider,
    step_change,
)
from helpers.infra.progress import SAVED_RUN_ENV, FinalLineTqdm
from helpers.research.ablation import load_model_embeddings, prompt_group_ablation
from helpers.research.steps.restore import Wiener
from helpers.research.steps.standard import Sharpen

from .conftest import INTEL_CLASS_MAP


def test_the_slider_redraws_the_picture_and_the_numbers_on_change(scene_dir, monkeypatch):
    monkeypatch.delenv(SAVED_RUN_ENV, raising=False)
    files = sorted((scene_dir / "0").iterdir())[:1]
    wiener = [Wiener(6.3)]
    box = sharpness_slider(files, restorations={"wiener 6.3": wiener})
    menu, slider, lines, view = box.children
    before, text = view.value, lines.value
    assert "sharpness 2.3 changes values by" in text
    assert (view.layout.width, view.layout.height) == tuple(f"{n}px" for n in Image.open(io.BytesIO(before)).size)
    slider.value = 4.0
    png, changes = sharpness_panel([model_input(files[0])], 4.0)
    assert view.value != before and view.value == png
    assert "sharpness 4 changes values by" in lines.value and f"at most {changes[0].max} " in lines.value
    menu.value = "wiener 6.3"  # a restoration instead: its own picture, the slider idle
    png, changes = change_panel([step_change(model_input(files[0]), "wiener 6.3", wiener)])
    assert view.value == png and slider.disabled and "wiener 6.3 changes values by" in lines.value
    assert changes[0].mean > 4 * sharpening_change(model_input(files[0]), 2.3).mean  # deconvolution moves far more
    menu.value = "sharpening"
    assert not slider.disabled and "sharpness 4 changes values by" in lines.value


@pytest.fixture
def dev_embeddings(make_config, dev_dir):
    config = make_config(data={"test": make_config().data.test,
                               "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}})
    return load_model_embeddings(config, "a", progress=False)


def test_checkboxes_recompute_from_cached_embeddings(dev_embeddings, count_image_batches, monkeypatch):
    monkeypatch.delenv(SAVED_RUN_ENV, raising=False)
    box = prompt_group_checkboxes(dev_embeddings)
    boxes, mode, result = box.children[0].children, box.children[1], box.children[2]
    table = prompt_group_ablation(dev_embeddings).set_index("variant")
    assert f"{table.loc['all groups', 'accuracy']:.4f}" in result.value and "312 prompts" in result.value
    for b in boxes:
        b.value = b.description == "blur"
    assert f"{table.loc['only blur', 'accuracy']:.4f}" in result.value and "24 prompts" in result.value
    mode.value = "prototype"
    assert f"{group_accuracy(dev_embeddings, ['blur'], 'prototype')['accuracy']:.4f}" in result.value
    for b in boxes:
        b.value = False
    assert "every class needs at least one prompt" in result.value
    assert count_image_batches["n"] == 0  # nothing was encoded


def test_a_saved_run_shows_the_accuracy_of_every_group_as_text(dev_embeddings, monkeypatch, capsys):
    monkeypatch.setenv(SAVED_RUN_ENV, "1")
    assert prompt_group_checkboxes(dev_embeddings) is None
    out = capsys.readouterr().out
    every = prompt_group_ablation(dev_embeddings).set_index("variant").loc["all groups", "accuracy"]
    flat = " ".join(out.split())  # wrapped at words for the notebook's width
    assert f": {every:.4f} [" in flat and "312 prompts" in flat and "run the source notebook live" in flat


def test_sharpening_change_on_a_real_image_is_small_and_measured(scene_dir):
    image = model_input(scene_dir / "0" / "0.jpg")
    assert image.size == (224, 224) and image.mode == "RGB"
    change = sharpening_change(image, 2.3)
    direct = np.abs(np.asarray(Sharpen(2.3)(image), dtype=np.int16) - np.asarray(image, dtype=np.int16))
    assert change.mean == pytest.approx(direct.mean()) and change.max == direct.max()
    # what a person cannot see: about 0.3 of 255 on average, 4 at most (README, 01_inspect)
    assert 0.2 < change.mean < 0.5 and 3 <= change.max <= 6 and 0.1 < change.changed < 0.5
    assert sharpening_change(image, 3.0).mean > change.mean > sharpening_change(image, 2.0).mean
    assert sharpening_change(image, 1.0).max == 0
    flat = difference_image(sharpening_change(image, 1.0).difference, 32)
    assert set(np.asarray(flat).ravel().tolist()) == {128}  # unchanged: mid-grey
    amplified = np.asarray(difference_image(change.difference, 32).convert("L"), dtype=int) - 128
    assert np.abs(amplified).max() > 32 * 2  # the change, amplified, is visible


def test_sharpness_panel_shows_the_crop_at_an_integer_zoom_and_the_change(scene_dir):
    images = [model_input(scene_dir / "0" / f"{i}.jpg") for i in (0, 1)]
    png, changes = sharpness_panel(images, 2.3, crop=112, zoom=2, gain=32)
    panel = Image.open(io.BytesIO(png)).convert("RGB")
    assert panel.size == (224 + 3 * 224 + 5 * 6, 22 + 2 * (224 + 6))  # native size; crop tiles 112 px at 2x
    x0, y0, x1, y1 = detail_box(images[0], 112)
    assert (x1 - x0, y1 - y0) == (112, 112)
    given = panel.crop((6 + 224 + 6, 22, 6 + 224 + 6 + 224, 22 + 224))
    sharpened = panel.crop((6 + 2 * (224 + 6), 22, 6 + 2 * (224 + 6) + 224, 22 + 224))
    assert given.tobytes() == images[0].crop((x0, y0, x1, y1)).resize((224, 224), Image.NEAREST).tobytes()
    assert sharpened.tobytes() == changes[0].after.crop((x0, y0, x1, y1)).resize((224, 224),
                                                                                     Image.NEAREST).tobytes()
    lines = change_lines(["0.jpg", "1.jpg"], changes)
    assert lines[0].startswith(f"0.jpg: sharpness 2.3 changes values by {changes[0].mean:.2f} of 255 on average, "
                               f"at most {changes[0].max} ")


def test_a_saved_run_shows_a_picture_and_says_how_to_move_the_slider(scene_dir, monkeypatch, capsys):
    shown = []
    monkeypatch.setattr("helpers.display.interactive.display", shown.append)
    monkeypatch.setenv(SAVED_RUN_ENV, "1")
    files = sorted((scene_dir / "0").iterdir())[:2]
    assert sharpness_slider(files) is None
    assert len(shown) == 1 and shown[0].data == sharpness_panel([model_input(p) for p in files], 2.3)[0]
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # wrapped at words for the notebook's width
    assert "changes values by" in flat and "run the source notebook live" in flat and "Sharpness 2.3." in flat


def test_final_line_progress_prints_the_finished_bar_only():
    buf = io.StringIO()
    for _ in FinalLineTqdm(range(64), desc="encode", file=buf, mininterval=0):
        pass
    text = buf.getvalue()
    assert "64/64" in text and "100%|" in text and not re.search(r"(?<!\d)0%\|", text) and text.count("\n") == 1
    buf = io.StringIO()
    for _ in FinalLineTqdm(range(3), file=buf, leave=False):
        pass
    assert buf.getvalue() == ""
