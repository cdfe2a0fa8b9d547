"""A labeled dev set that looks like the challenge's test set: any labeled ImageFolder, degraded as the challenge
was, with the blur chosen so that the dev set's estimated blur matches the test set's."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from natsort import natsorted
from tqdm.auto import tqdm

from ..config import DevData, read_yaml
from .blur import blur_summary, calibrate_sigma, degrade_bytes, estimate_sigma, jpeg_quality
from .data import DataError, is_image_file, load_dev_set, open_image, require_folder, require_usable

log = logging.getLogger(__name__)


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Every image file below `folder`, in natural order of the paths."""
    folder = Path(folder)
    require_folder(folder, "a folder of images is expected")
    files = natsorted((p for p in folder.rglob("*") if is_image_file(p)), key=str)
    if not files:
        raise DataError(f"{folder}: no images below this folder")
    return files[:limit]


def measure_blur(files: list[Path], progress: bool = False) -> dict:
    """Blur statistics of a set of images (sigma in px at each image's own size) and their JPEG qualities, with the
    per-image `sigmas` and `qualities` (for statistics of subsets without measuring again)."""
    sigmas = [estimate_sigma(open_image(p))
              for p in tqdm(files, desc="estimate blur", unit="img", disable=not progress)]
    qualities = [jpeg_quality(p) for p in files]
    return {**summarize_blur(sigmas, qualities), "sigmas": sigmas, "qualities": qualities}


def summarize_blur(sigmas: list[float], qualities: list[int | None]) -> dict:
    """blur_summary of the sigmas, and the most common JPEG quality."""
    return {**blur_summary(sigmas), "jpeg_quality": Counter(qualities).most_common(1)[0][0]}


def parse_class_map(text: str | None) -> dict[str, str] | None:
    """`buildings=Buildings,forest=Forests` (or the path of a YAML/JSON mapping) -> dict."""
    if not text:
        return None
    if Path(text).is_file():
        mapping = read_yaml(Path(text), "class map")
        if not isinstance(mapping, dict):
            raise DataError(f"{text}: a class map file must hold a mapping folder -> class name")
        return {str(k): str(v) for k, v in mapping.items()}
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise DataError(f"--class-map '{text}': expected folder=Class,folder=Class,...")
    return {k.strip(): v.strip() for k, v in pairs}


def match_test_blur(src_files: list[Path], test_dir: Path, sample: int = 96, kernel_size: int | None = None,
                    size: int = 224) -> dict:
    """The degradation parameters that make `src_files` look like the test set: its JPEG quality (read from the
    files' quantisation tables) and the sigma whose estimated blur matches the test set's median."""
    test = measure_blur(list_images(test_dir, limit=512))
    step = max(1, len(src_files) // sample)
    images = [open_image(p) for p in src_files[::step][:sample]]
    sigma = calibrate_sigma(images, test["median"], test["jpeg_quality"], size, kernel_size)
    return {"sigma": sigma, "quality": test["jpeg_quality"], "test_blur_median": round(test["median"], 3)}


def first_per_class(images, limit: int | None):
    """The first `limit` images of each class, in the set's (natural) order; all of them without a limit."""
    if limit is None:
        return images
    seen = Counter()
    keep = []
    for i, label in enumerate(images.labels.tolist()):
        seen[label] += 1
        if seen[label] <= limit:
            keep.append(i)
    return replace(images, files=[images.files[i] for i in keep], labels=images.labels[keep])


def build_dev_set(src: str | Path, out: str | Path, classes: list[str], class_map: dict[str, str] | None,
                  sigma: float, quality: int | None, kernel_size: int | None = None, size: int = 224,
                  provenance: dict | None = None, progress: bool = True, limit_per_class: int | None = None) -> dict:
    """Degrade every image of the labeled folder `src` (with `limit_per_class`, the first N of each class in
    natural order) into `out/<class name>/<stem>.jpg`; returns what was done, with where each image's clean photo is
    (`sources`), also written to `out/degradation.json`.

    Deterministic (no randomness; JPEG encoding is a pure function of the pixels). The set is written into a
    temporary folder beside `out` and moved into place when complete, so `out` is never half-built.
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it to rebuild the dev set")
    if out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"--out {out} is inside the source folder {src}: the dev set would be read as a class "
                        "folder of its own source; write it outside")
    source = first_per_class(load_dev_set(src, classes, class_map), limit_per_class)
    require_usable(source.files, progress)
    stray = [p for p in src.rglob("*") if p.is_file() and not is_image_file(p)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for c in classes:
            (tmp / c).mkdir()
        names, sources = set(), {}
        for path, label in tqdm(list(zip(source.files, source.labels)), desc="make dev set", unit="img",
                                disable=not progress):
            target = tmp / classes[label] / f"{path.stem}.{'png' if quality is None else 'jpg'}"
            if target in names:
                raise DataError(f"{path}: a second image named {path.stem} maps to class {classes[label]}")
            names.add(target)
            sources[target.relative_to(tmp).as_posix()] = path.relative_to(src).as_posix()
            target.write_bytes(degrade_bytes(open_image(path), sigma, quality, size, kernel_size))
        info = {"source": str(src), "images": len(source), "per_class": dict(zip(classes, np.bincount(
            source.labels, minlength=len(classes)).tolist())), "limit_per_class": limit_per_class,
            "class_map": class_map,
            "degradation": {"size": size, "resize": "bicubic", "sigma": sigma, "kernel_size": kernel_size,
                            "jpeg_quality": quality}, "ignored_non_images": [str(p) for p in stray],
            # each dev image's clean photo, below `source` (what `helpers.research.restoration` measures against)
            "sources": sources, **(provenance or {})}
        (tmp / "degradation.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info



def build_missing_dev_set(dev: DevData, classes: list[str], progress: bool = False) -> bool:
    """Build the config's dev folder from its `data.dev.build` recipe when the folder is not there (the demo's small
    dev set, on first use, whichever notebook or command comes first); returns whether it built it. Another process
    building it at the same moment is fine: the folder appears whole, from one of them."""
    path = Path(dev.path)
    if dev.build is None or path.exists():
        return False
    recipe = dev.build
    if not Path(recipe.source).is_dir():
        raise DataError(f"{path}: no such folder (data.dev.path), and the labeled photos to build it from are not "
                        f"there either: {recipe.source} (data.dev.build.source); put them there, or build a dev set "
                        "with `make dev-data` and name it in data.dev.path")
    log.info("building the dev set %s from %s (data.dev.build: sigma %g px, JPEG quality %d%s): first use",
             path, recipe.source, recipe.sigma, recipe.quality,
             f", {recipe.limit_per_class} per class" if recipe.limit_per_class else "")
    try:
        build_dev_set(recipe.source, path, classes, recipe.class_map, recipe.sigma, recipe.quality,
                      provenance={"built_from": "data.dev.build"}, progress=progress,
                      limit_per_class=recipe.limit_per_class)
    except (DataError, OSError):
        if path.is_dir():  # another process built it first
            return False
        raise
    return True
