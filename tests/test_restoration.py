"""The restoration steps (helpers/research/steps/restore.py): scikit-image's filters reproduced to 1e-6, a known blur
undone on real photos, edges that do not ring, and `sigma: auto` resolved once per run into the cache key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio
from skimage.restoration import richardson_lucy, wiener

from helpers.bench import main as bench_main
from helpers.config import ConfigError, build_step
from helpers.research.blur import degrade
from helpers.research.restoration import apply_steps
from helpers.research.steps import view
from helpers.research.steps.restore import (
    RichardsonLucy,
    UnsharpMask,
    Wiener,
    gaussian_psf,
    richardson_lucy_deconvolve,
    to_channels,
    to_image,
    wiener_deconvolve,
)
from helpers.research.steps.standard import RGB, CenterCrop, Resize
from helpers.runs.pipeline import predict

from .conftest import INTEL, INTEL_CLASS_MAP, PROJECT_ROOT, require_shared

RNG = np.random.default_rng(0)
NOISE = RNG.random((3, 60, 84))  # not square: height and width are not mixed up


@pytest.mark.parametrize("sigma", [1.3, 6.26])
def test_wiener_is_scikit_images_on_the_mirrored_or_the_periodic_image(sigma):
    """`mirror` is skimage's wiener on the image mirrored about its right and bottom edges (the periodic image that
    then meets its mirror image at every edge), cropped back; `periodic` is skimage's wiener on the image as it is."""
    h, w = NOISE.shape[1:]
    mirrored = [np.pad(c, ((0, h), (0, w)), mode="symmetric") for c in NOISE]
    expected = np.stack([wiener(c, gaussian_psf(sigma), 0.1, clip=False)[:h, :w] for c in mirrored])
    periodic = np.stack([wiener(c, gaussian_psf(sigma), 0.1, clip=False) for c in NOISE])
    np.testing.assert_allclose(wiener_deconvolve(NOISE, sigma, 0.1, "mirror"), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(wiener_deconvolve(NOISE, sigma, 0.1, "periodic"), periodic, rtol=0, atol=1e-12)
    # the step's own arithmetic, float32 with the filter computed once per size
    single = wiener_deconvolve(NOISE.astype(np.float32), sigma, 0.1, "mirror")
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, expected, rtol=0, atol=1e-6)


def test_richardson_lucy_is_scikit_images_away_from_its_zero_padded_edges():
    """skimage's richardson_lucy pads with zeros; on the image mirrored out by more than the iterations carry the
    edge inwards (5 x the PSF's radius of 4 px), its centre is the mirror-edged deconvolution."""
    iterations, pad = 5, 40
    mirrored = np.stack([np.pad(c, pad, mode="symmetric") for c in NOISE])
    expected = richardson_lucy(mirrored, gaussian_psf(1.0)[None], num_iter=iterations, clip=False)
    ours = richardson_lucy_deconvolve(NOISE, 1.0, iterations, "mirror")
    np.testing.assert_allclose(ours, expected[:, pad:-pad, pad:-pad], rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def photos():
    """Four real Intel photos (sharp), at 224 as the model sees them, and the same blurred as the dev set is."""
    files = sorted(require_shared(INTEL).glob("*/*.jpg"))[::400][:4]
    clean = [Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC) for p in files]
    return clean, [degrade(img, 6.26, quality=None) for img in clean]


def _psnr(clean, images) -> float:
    return float(np.mean([peak_signal_noise_ratio(np.asarray(c), np.asarray(i)) for c, i in zip(clean, images)]))


def test_deconvolution_restores_a_known_blur_and_mirrored_edges_do_not_ring(photos):
    clean, blurred = photos
    before = _psnr(clean, blurred)
    gains = {name: _psnr(clean, [step(b) for b in blurred]) - before for name, step in {
        "wiener": Wiener(6.26, balance=0.01), "periodic": Wiener(6.26, edges="periodic", balance=0.01),
        "richardson_lucy": RichardsonLucy(6.26, iterations=20), "unsharp": UnsharpMask(6.0, 1.0)}.items()}
    assert gains["wiener"] > 1.5 and gains["richardson_lucy"] > 0.6 and gains["unsharp"] > 0.3
    assert gains["periodic"] < gains["wiener"] - 4.0  # the wrapped edges ring into the image


def test_conversions_round_trip_8_bit_images():
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for img in (Image.fromarray(pixels), Image.fromarray(pixels[..., 0])):
        assert np.array_equal(np.asarray(to_image(to_channels(img))), np.asarray(img))
        assert to_image(to_channels(img)).mode == img.mode


def test_sigma_auto_is_filled_in_once_and_is_part_of_the_key():
    step = build_step({"wiener": {"sigma": "auto", "balance": 0.05}}, "models.a.preprocess[0]")
    assert step.wants_blur and step.key()["sigma"] == "auto"
    with pytest.raises(ValueError, match="sigma is 'auto' and has not been filled in"):
        step(Image.new("RGB", (8, 8)))
    resolved = step.with_blur(6.3137)
    assert resolved == Wiener(6.31, balance=0.05) and not resolved.wants_blur
    assert resolved.with_blur(2.0) == resolved  # a number stays
    keys = {view([step.with_blur(s)], 224).key()["steps"][-1]["sigma"] for s in (6.31, 6.26)}
    assert keys == {6.31, 6.26}


@pytest.mark.parametrize(("spec", "message"), [
    ({"wiener": {"sigma": "6"}}, r"wiener\.sigma must be a number of px or 'auto'"),
    ({"wiener": {"sigma": 0}}, r"wiener\.sigma must be between 0 \(excluded\) and 50 px"),
    ({"richardson_lucy": {"edges": "zero"}}, r"richardson_lucy\.edges must be one of mirror, periodic"),
    ({"richardson_lucy": {"iterations": 0}}, r"iterations must be between 1 and 1000"),
    ({"wiener": {"balance": -1}}, r"wiener\.balance must be between 0 \(excluded\) and 100"),
    ({"unsharp_mask": {"radius": 0}}, r"unsharp_mask\.radius must be between 0 \(excluded\) and 50 px"),
])
def test_a_bad_restoration_parameter_is_one_error_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_step(spec, "models.a.preprocess[0]")


# --- a run whose config says sigma: auto ------------------------------------------------------------------------


def test_a_run_fills_in_sigma_auto_once_records_it_and_keys_the_cache_by_it(make_config, tmp_path,
                                                                            count_image_batches):
    data = {"test": make_config().data.test, "limit": 8}
    entry = {k: v for k, v in dataclasses.asdict(make_config().models["a"]).items() if v is not None}
    models = {"a": {**entry, "sharpness": 1.0, "preprocess": [{"wiener": {"sigma": "auto", "balance": 0.1}}]}}

    def run(folder, preprocess=None):
        entries = {"a": {**models["a"], "preprocess": preprocess}} if preprocess else models
        config = make_config(data=data, models=entries, ensemble={"weights": {"a": 1.0}})
        predict(config, tmp_path / folder, progress=False)
        return count_image_batches["n"]

    encoded = run("first")
    assert encoded > 0
    manifest = json.loads((tmp_path / "first" / "manifest.json").read_text())
    sigma = manifest["auto_blur"]["sigma_px"]
    assert 5.5 < sigma < 7.0 and manifest["auto_blur"]["split"] == "test"  # the challenge's ~6.3 px
    assert manifest["auto_blur"]["filled_in"] == ["models.a.preprocess[0]"]  # not the analyses: no analysis ran
    recorded = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert recorded["models"]["a"]["preprocess"] == [{"wiener": {"sigma": sigma, "balance": 0.1}}]
    view = json.loads((tmp_path / "first" / "models" / "a" / "model.json").read_text())["views"][0]
    assert view["steps"][-1] == {"step": "wiener", "sigma": sigma, "edges": "mirror", "balance": 0.1}
    # every later use reads the cache, the estimate's too; the same sigma given as a number is the same entry
    assert run("again") == encoded and run("number", [{"wiener": {"sigma": sigma}}]) == encoded
    # another blur (other test images, a changed estimate) is another entry: nothing stale is read
    (estimate,) = (Path(make_config().cache_dir) / "blur").glob("*.json")
    estimate.write_text(json.dumps({**json.loads(estimate.read_text()), "sigma_px": round(sigma + 0.5, 2)}))
    assert run("changed") > encoded
    assert yaml.safe_load((tmp_path / "changed" / "config.yaml").read_text())["models"]["a"]["preprocess"] == [
        {"wiener": {"sigma": round(sigma + 0.5, 2), "balance": 0.1}}]


def test_the_restoration_bench_measures_against_the_dev_sets_clean_photos(make_config, dev_dir, tmp_path, capsys):
    """`python -m helpers.bench restoration` on a dev set built from real photos: the blurred images made again
    are the dev files byte for byte, deconvolution gains over the blurred input, periodic edges lose."""
    build = {"source": str(dev_dir), "sigma": 6.26, "quality": 75, "limit_per_class": 1,
             "class_map": INTEL_CLASS_MAP}
    config = make_config(data={"test": make_config().data.test, "limit": 12,
                               "dev": {"path": str(tmp_path / "dev"), "build": build}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    bench_main(["restoration", "--config", str(path), "--rounds", "1", "--out", str(tmp_path / "r.json")])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 6 == report["degraded_identical_to_dev_files"]
    gains = report["psnr_gain_db"]
    assert gains["none (the blurred input)"] == 0 and abs(report["winner_sharpening_gain_db"]) < 0.2
    assert report["best_deconvolution_gain_db"] == max(v for k, v in gains.items() if k.startswith(("wiener", "rich")))
    assert report["best_deconvolution_gain_db"] > 0.5 > gains["wiener balance=0.1 edges=periodic"]
    assert report["wiener_images_per_s"] > 0 and report["machine"]


def test_the_restoration_sweep_encodes_each_setting_once(monkeypatch):
    """configs/sweeps/restoration.yaml: each Wiener setting is a cache entry of its own (its points wait for the
    base alone, and encode their own views), while the model left as it was is the base's entry."""
    from helpers.runs.sweep import design_points, make_design
    from helpers.runs.sweep.launch import dependencies, image_needs

    monkeypatch.chdir(PROJECT_ROOT)
    points = design_points(make_design("configs/sweeps/restoration.yaml", [], [], False))
    needs = [image_needs(p) for p in points]
    assert len(points) == 3 and all(len(n) == 2 for n in needs)  # a cache entry per model (one view each)
    assert needs[1] & needs[0] == needs[2] & needs[0] and len(needs[1] & needs[0]) == 1  # metaclip: the base's
    assert not (needs[1] - needs[0]) & (needs[2] - needs[0])  # eva: each balance its own entry
    assert dependencies(points) == {points[0].id: set(), points[1].id: {points[0].id}, points[2].id: {points[0].id}}


def test_a_restoration_runs_where_the_config_lists_it_before_or_after_the_resize(photos):
    """After the model's resize by default; listed before `resize` (a list that orders every step), at the image's
    own size, with the PSF in that size's pixels."""
    after = view([Wiener(6.26)], 224)
    before = view([Wiener(12.5), Resize(), CenterCrop(), RGB()], 224)
    assert [s["step"] for s in after.key()["steps"]] == ["resize", "center_crop", "rgb", "wiener"]
    assert [s["step"] for s in before.key()["steps"]] == ["wiener", "resize", "center_crop", "rgb"]
    large = photos[1][0].resize((448, 448), Image.BICUBIC)
    first, second = (np.asarray(apply_steps(list(v.steps), large), dtype=float) for v in (before, after))
    assert first.shape == second.shape == (224, 224, 3)
    assert 0 < np.abs(first - second).mean() < 10  # close (the same blur undone at either size), not the same
