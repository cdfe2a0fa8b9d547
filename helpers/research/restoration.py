"""How close preprocessing brings the dev set's blurred images to their clean photos: PSNR and SSIM (scikit-image's
metrics) against the clean photo as the model would see it (bicubic to 224), and the step's rate on this CPU.

The dev-set builder records where each dev image's clean photo is (`degradation.json`: `source`, `sources`); the
blurred images are made again from those photos as the dev set was built (`blur.degrade_bytes` with its recipe),
which gives the dev files byte for byte (`DegradedPairs.identical` counts them).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .blur import degrade_bytes
from .data import DataError, open_image
from .steps import Step, apply_steps
from .steps.standard import Sharpen


@dataclass
class DegradedPairs:
    """The dev set's clean photos at the model's size and the same photos degraded as the dev set was built."""

    names: list[str]  # each dev image, relative to the dev folder
    clean: list[Image.Image]
    blurred: list[Image.Image]
    recipe: dict  # degradation.json's `degradation`: size, sigma, kernel_size, jpeg_quality
    identical: int  # how many of `blurred` are the dev set's own files, byte for byte


def degraded_pairs(dev_dir: str | Path, limit: int | None = None) -> DegradedPairs:
    """The first `limit` dev images (every one without), as `DegradedPairs`."""
    dev_dir = Path(dev_dir)
    info = json.loads((dev_dir / "degradation.json").read_text()) if (dev_dir / "degradation.json").is_file() else {}
    if "sources" not in info:
        raise DataError(f"{dev_dir}/degradation.json does not say where the dev images' clean photos are (a dev set "
                        "built before it recorded them): remove the folder and build it again (make dev-demo, "
                        "make dev-data, or the first run of its config)")
    recipe = info["degradation"]
    names = sorted(info["sources"])[:limit]
    clean, blurred, identical = [], [], 0
    for name in names:
        photo = open_image(Path(info["source"]) / info["sources"][name]).convert("RGB")
        clean.append(photo.resize((recipe["size"], recipe["size"]), Image.BICUBIC))
        # degrade_bytes's own resize of an image already at the size is a copy: the same bytes as from the photo
        data = degrade_bytes(clean[-1], recipe["sigma"], recipe["jpeg_quality"], recipe["size"], recipe["kernel_size"])
        identical += (dev_dir / name).read_bytes() == data
        blurred.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return DegradedPairs(names, clean, blurred, recipe, identical)


def preprocessing_settings(factors: list[float], restorations: dict[str, list[Step]]) -> dict[str, list[Step]]:
    """The image as given, each sharpening factor (other than 1: the image as given) and each restoration, by name:
    what notebook 01 shows side by side and measures."""
    return {"as given": [], **{f"sharpness {f:g}": [Sharpen(f)] for f in factors if f != 1.0}, **restorations}


def steps_label(steps: list[Step]) -> str:
    """The steps with their parameters, for tables: `wiener sigma=6.31 edges=mirror balance=0.1`."""
    return " > ".join(" ".join([step.name, *(f"{f.name}={getattr(step, f.name)}" for f in fields(step))])
                      for step in steps) or "none"


def image_quality(clean: Image.Image, image: Image.Image) -> tuple[float, float]:
    """PSNR (dB) and SSIM of an 8-bit RGB image against its clean original (scikit-image's metrics, over the
    channels; SSIM with its default 7 x 7 window)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = np.asarray(clean), np.asarray(image)
    return (float(peak_signal_noise_ratio(a, b, data_range=255)),
            float(structural_similarity(a, b, channel_axis=2, data_range=255)))


def restoration_table(pairs: DegradedPairs, settings: dict[str, list[Step]], progress: bool = False) -> pd.DataFrame:
    """One row per setting (a name -> its steps; [] is the blurred input, which every gain is measured from):
    mean PSNR and SSIM against the clean photos, the gain in dB over the blurred input, and the images per second of
    the steps on this CPU (one pass, PIL image in, PIL image out, after one image to import and set up what they
    use)."""
    from tqdm.auto import tqdm

    rows = []
    for name, steps in tqdm(settings.items(), desc="restoration settings", disable=not progress):
        apply_steps(steps, pairs.blurred[0])
        started = time.perf_counter()
        restored = [apply_steps(steps, img) for img in pairs.blurred]
        seconds = time.perf_counter() - started
        quality = np.array([image_quality(c, r) for c, r in zip(pairs.clean, restored)])
        rows.append({"setting": name, "psnr_db": quality[:, 0].mean(), "ssim": quality[:, 1].mean(),
                     "images_per_s": len(restored) / seconds if steps else None})
    table = pd.DataFrame(rows)
    (blurred,) = [name for name, steps in settings.items() if not steps]
    reference = table.set_index("setting").loc[blurred]
    table.insert(2, "gain_db", table["psnr_db"] - reference["psnr_db"])
    table.insert(4, "ssim_gain", table["ssim"] - reference["ssim"])
    return table


def step_rate(pairs: DegradedPairs, step: Step, rounds: int = 3) -> dict[str, float]:
    """Images per second of one step alone over the blurred images, the best of `rounds` passes (after one image,
    which computes its transfer function, once per image size): by the clock (`wall`), and per second of this
    process's CPU time (`cpu`: what one core gives it when no other process shares the core)."""
    step(pairs.blurred[0])
    wall = cpu = float("inf")
    for _ in range(rounds):
        started, started_cpu = time.perf_counter(), time.process_time()
        for img in pairs.blurred:
            step(img)
        wall, cpu = min(wall, time.perf_counter() - started), min(cpu, time.process_time() - started_cpu)
    return {"wall": len(pairs.blurred) / wall, "cpu": len(pairs.blurred) / cpu}
