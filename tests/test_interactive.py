"""The notebooks' widgets: what they show and that they recompute from the cache."""

import io

import pytest
from PIL import Image

from helpers.ablation import load_model_embeddings, prompt_group_ablation
from helpers.interactive import group_accuracy, prompt_group_checkboxes, sharpness_slider, sharpness_strip

from .conftest import INTEL_CLASS_MAP


def test_sharpness_strip_shows_each_image_beside_its_sharpened_version(scene_dir):
    files = sorted((scene_dir / "0").iterdir())[:2]
    strip = Image.open(io.BytesIO(sharpness_strip(files, 2.3)))
    assert strip.size == (448, 448)
    assert sharpness_strip(files, 1.0) != sharpness_strip(files, 3.0)
    left, right = strip.crop((0, 0, 224, 224)), strip.crop((224, 0, 448, 224))
    assert left.tobytes() != right.tobytes()


def test_the_slider_redraws_on_change(scene_dir):
    files = sorted((scene_dir / "0").iterdir())[:1]
    box = sharpness_slider(files)
    slider, view = box.children
    before = view.value
    slider.value = 4.0
    assert view.value != before and view.value == sharpness_strip(files, 4.0)


@pytest.fixture
def dev_embeddings(make_config, dev_dir):
    config = make_config(data={"test": make_config().data.test,
                               "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}})
    return load_model_embeddings(config, "a", progress=False)


def test_checkboxes_recompute_from_cached_embeddings(dev_embeddings, count_image_batches):
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
