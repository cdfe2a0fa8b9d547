"""Image sets (the challenge test folder, labeled dev folders), their fingerprints, and the preprocessing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from natsort import natsorted
from PIL import Image

from .errors import UserError

# torchvision's ImageFolder extensions, which the winner's loader accepted
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(UserError, ValueError):
    """An image folder that cannot be used; the message names the path."""


@dataclass
class ImageSet:
    root: Path
    files: list[Path]
    classes: list[str]
    ids: list[int] | None = None  # test sets: the integer file stems, as the submission wants them
    labels: np.ndarray | None = None  # dev sets: class indices into `classes`

    def __len__(self) -> int:
        return len(self.files)


def _images_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def read_classes(root: Path) -> list[str]:
    path = Path(root) / "classes.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; the test folder needs classes.json (the class names, label = index)")
    classes = json.loads(path.read_text())
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: expected a JSON list of class names")
    return classes


def load_test_set(root: str | Path, limit: int | None = None) -> ImageSet:
    """`root/<sub-folder>/<id>.jpg` + `root/classes.json`, in natural order of the paths (the winner's order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such test folder (data.test); `make data` downloads the challenge set")
    classes = read_classes(root)
    files = natsorted((p for sub in root.iterdir() if sub.is_dir() for p in _images_in(sub)), key=str)
    if not files:
        raise DataError(f"{root}: no images in its sub-folders (expected {root}/0/<id>.jpg)")
    ids = []
    for p in files:
        if not p.stem.isdigit():
            raise DataError(f"{p}: a test image's file name must be its integer id")
        ids.append(int(p.stem))
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{root}: id {dup} appears more than once")
    if limit is not None:
        files, ids = files[:limit], ids[:limit]
    return ImageSet(root, files, classes, ids=ids)


def load_dev_set(root: str | Path, classes: list[str], class_map: dict[str, str] | None = None,
                 limit: int | None = None) -> ImageSet:
    """A labeled ImageFolder (`root/<class folder>/<image>`); `class_map` maps folder names to `classes`.

    With `limit`, images are taken round-robin over the classes in natural order, so a small dev set stays balanced.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dev folder (data.dev.path)")
    folders = natsorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root}: no class folders in the dev folder")
    class_map = class_map or {}
    per_class = []
    for name in folders:
        target = class_map.get(name, name)
        if target not in classes:
            raise DataError(f"{root}/{name}: folder maps to '{target}', not one of {', '.join(classes)}; "
                            "add it to data.dev.class_map")
        images = natsorted(_images_in(root / name), key=str)
        if not images:
            raise DataError(f"{root}/{name}: no images in this class folder")
        per_class.append((classes.index(target), images))
    unused = set(class_map) - set(folders)
    if unused:
        raise DataError(f"{root}: data.dev.class_map names '{sorted(unused)[0]}', which is not a folder there")
    pairs = [(p, c) for c, images in per_class for p in images]
    if limit is not None and limit < len(pairs):
        rounds = max(len(images) for _, images in per_class)
        pairs = [(images[r], c) for r in range(rounds) for c, images in per_class if r < len(images)][:limit]
        pairs = natsorted(pairs, key=lambda pc: (folders.index(pc[0].parent.name), pc[0].name))
    return ImageSet(root, [p for p, _ in pairs], classes, labels=np.array([c for _, c in pairs], dtype=np.int64))


def file_digest(path: Path) -> str:
    """The content key of an image file: the embedding cache and the fingerprints use it."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def fingerprint(image_set: ImageSet, digests: list[str] | None = None) -> dict:
    """What identifies the data of a run: count, and a hash over relative paths, contents and labels."""
    digests = digests or [file_digest(p) for p in image_set.files]
    h = hashlib.sha256()
    labels = image_set.labels if image_set.labels is not None else [None] * len(image_set)
    for p, d, y in zip(image_set.files, digests, labels):
        h.update(f"{p.relative_to(image_set.root)}\t{d}\t{y}\n".encode())
    return {"root": str(image_set.root), "images": len(image_set), "sha256": h.hexdigest()}


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


@dataclass(frozen=True)
class Sharpen:
    """RandomAdjustSharpness(factor, p=1) as the winner used it: always adjust_sharpness(factor)."""

    factor: float

    def __call__(self, img: Image.Image) -> Image.Image:
        return TF.adjust_sharpness(img, self.factor)


@dataclass(frozen=True)
class Preprocess:
    """The winner's per-model preprocessing: squash-resize, crop, RGB, sharpen, normalise (SPEC 1, step 2)."""

    size: int = 224
    sharpness: float = 1.0
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def transform(self) -> T.Compose:
        steps = [
            T.Resize((self.size, self.size), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.size),
            T.Lambda(_to_rgb),
        ]
        if self.sharpness != 1.0:
            steps.append(Sharpen(self.sharpness))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def key(self) -> dict:
        return {"recipe": "resize-bicubic/center-crop/rgb/adjust-sharpness/normalize", "size": self.size,
                "sharpness": self.sharpness, "mean": list(self.mean), "std": list(self.std)}


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses image files, for a DataLoader."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            with Image.open(self.files[i]) as img:
                return self.transform(img)
        except OSError as e:
            raise DataError(f"{self.files[i]}: cannot read this image: {e}") from e
