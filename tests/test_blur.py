"""Blur estimation on known blurs, the challenge's degradation, and the dev-set builder."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.__main__ import main
from helpers.research.blur import calibrate_sigma, degrade, degrade_bytes, estimate_sigma, jpeg_quality
from helpers.research.data import DataError, load_dev_set
from helpers.research.devset import build_dev_set, list_images

from .conftest import CLASSES, INTEL_CLASS_MAP


@pytest.fixture(scope="module")
def photos(dev_dir):
    """One real, unblurred Intel photo (150x150) per class."""
    return [Image.open(sorted((dev_dir / folder).iterdir())[0]).convert("RGB") for folder in INTEL_CLASS_MAP]


@pytest.mark.parametrize("quality", [None, 75], ids=["lossless", "jpeg75"])
@pytest.mark.parametrize("sigma", [2, 4, 6, 8, 10])
def test_known_blurs_come_back_within_one_pixel(photos, sigma, quality):
    estimates = [estimate_sigma(degrade(p, sigma, quality)) for p in photos]
    assert abs(np.median(estimates) - sigma) <= 1.0, estimates
    assert all(abs(e - sigma) <= 1.5 for e in estimates), estimates


def test_sharp_photos_read_as_sharp(photos):
    """Unblurred photos at their own 150 px, and upscaled to 224 (bicubic adds a little blur)."""
    assert all(estimate_sigma(p) < 1.0 for p in photos)
    assert all(estimate_sigma(degrade(p, 0, 75)) < 1.0 for p in photos)


def test_the_estimate_grows_with_the_blur(photos):
    estimates = [estimate_sigma(degrade(photos[0], s, 75)) for s in (0, 1, 3, 5, 7, 9)]
    assert estimates == sorted(estimates)


def test_jpeg_quality_is_read_from_the_quantisation_tables(scene_dir, photos, tmp_path):
    assert jpeg_quality(next((scene_dir / "0").iterdir())) == 75  # the challenge's files
    for q in (40, 75, 90):
        (tmp_path / f"{q}.jpg").write_bytes(degrade_bytes(photos[0], 3, q))
        assert jpeg_quality(tmp_path / f"{q}.jpg") == q
    photos[0].save(tmp_path / "x.png")
    assert jpeg_quality(tmp_path / "x.png") is None


def test_degradation_is_deterministic_and_challenge_shaped(photos):
    data = degrade_bytes(photos[1], 6.3, 75)
    assert data == degrade_bytes(photos[1], 6.3, 75)
    image = degrade(photos[1], 6.3, 75)
    assert image.size == (224, 224) and image.format == "JPEG"


def test_calibration_finds_the_sigma_that_matches_a_target(photos):
    target = float(np.median([estimate_sigma(degrade(p, 5.0, 75)) for p in photos[:3]]))
    assert abs(calibrate_sigma(photos[:3], target, 75, tol=0.05) - 5.0) <= 0.3


def test_estimate_blur_cli_on_real_challenge_images(scene_dir, capsys):
    assert main(["estimate-blur", str(scene_dir), "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    sigma = float(out[-1].removeprefix("sigma_px="))
    assert out[-1].startswith("sigma_px=") and 5.5 < sigma < 7.2  # the full test set measures 6.3
    row = dict(zip(out[0].split(), out[1].split()))
    assert row["set"] == "all" and row["jpeg_q"] == "75"


def test_make_dev_maps_classes_and_is_deterministic(dev_dir, tmp_path):
    info = build_dev_set(dev_dir, tmp_path / "one", CLASSES, INTEL_CLASS_MAP, sigma=6.3, quality=75, progress=False)
    build_dev_set(dev_dir, tmp_path / "two", CLASSES, INTEL_CLASS_MAP, sigma=6.3, quality=75, progress=False)
    files = list_images(tmp_path / "one")
    assert len(files) == 24 == info["images"] and info["per_class"] == dict.fromkeys(CLASSES, 4)
    assert sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_dir()) == sorted(CLASSES)
    assert all((tmp_path / "two" / p.relative_to(tmp_path / "one")).read_bytes() == p.read_bytes() for p in files)
    assert jpeg_quality(files[0]) == 75 and Image.open(files[0]).size == (224, 224)
    recorded = json.loads((tmp_path / "one" / "degradation.json").read_text())
    assert recorded["degradation"] == {"size": 224, "resize": "bicubic", "sigma": 6.3, "kernel_size": None,
                                       "jpeg_quality": 75}
    # where each dev image's clean photo is, below the source folder
    assert set(recorded["sources"]) == {p.relative_to(tmp_path / "one").as_posix() for p in files}
    assert all((dev_dir / src).is_file() and Path(src).stem == Path(dev).stem
               for dev, src in recorded["sources"].items())
    dev = load_dev_set(tmp_path / "one", CLASSES)  # class folders need no class_map any more
    assert np.bincount(dev.labels).tolist() == [4] * 6


def test_make_dev_refuses_to_overwrite_or_guess(dev_dir, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(DataError, match="already exists"):
        build_dev_set(dev_dir, tmp_path / "exists", CLASSES, INTEL_CLASS_MAP, 6.3, 75, progress=False)
    with pytest.raises(DataError, match="folder maps to 'sea'"):
        build_dev_set(dev_dir, tmp_path / "x", CLASSES, {k: v for k, v in INTEL_CLASS_MAP.items() if k != "sea"},
                      6.3, 75, progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_make_dev_cli_matches_the_test_sets_blur(dev_dir, scene_dir, tmp_path, capsys):
    class_map = ",".join(f"{k}={v}" for k, v in INTEL_CLASS_MAP.items())
    assert main(["make-dev", str(dev_dir), "--out", str(tmp_path / "dev"), "--test", str(scene_dir),
                 "--class-map", class_map, "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    dev_sigma = float(last.rsplit("sigma_px=", 1)[1])
    info = json.loads((tmp_path / "dev" / "degradation.json").read_text())
    test_sigma = info["matched_to"]["test_blur_median"]
    assert info["degradation"]["jpeg_quality"] == 75
    assert abs(dev_sigma - test_sigma) < 0.35, (dev_sigma, test_sigma)
