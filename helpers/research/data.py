"""Image sets (the challenge test folder, labeled dev folders), their files' checks and fingerprints."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from natsort import natsorted
from PIL import Image
from tqdm.auto import tqdm

from ..infra.errors import UserError, describe_os_error

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, which the winner's loader accepted
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError, ValueError):
    """An image folder that cannot be used; the message names the path."""


@dataclass(frozen=True)
class SkippedImage:
    """An image file left out of a run (`on_bad_image: skip`), where it stood in its set, and why."""

    index: int  # position in the set as listed, before anything was left out
    path: Path
    reason: str
    id: int | None = None
    label: int | None = None

    def record(self, root: Path) -> dict:
        return {"file": str(self.path.relative_to(root)), "id": self.id, "label": self.label, "reason": self.reason}


@dataclass
class ImageSet:
    root: Path
    files: list[Path]
    classes: list[str]
    ids: list[int] | None = None  # test sets: the integer file stems, as the submission wants them
    labels: np.ndarray | None = None  # dev sets: class indices into `classes`
    digests: list[str] | None = None  # the files' content keys, once read (`check_images`)
    skipped: list[SkippedImage] = field(default_factory=list)  # unreadable files left out

    def __len__(self) -> int:
        return len(self.files)

    def without(self, problems: dict[int, str]) -> ImageSet:
        """This set less the files at the positions in `problems` (position -> reason), which it records."""
        keep = [i for i in range(len(self)) if i not in problems]
        skipped = [SkippedImage(i, self.files[i], reason, self.ids[i] if self.ids is not None else None,
                                int(self.labels[i]) if self.labels is not None else None)
                   for i, reason in sorted(problems.items())]
        return ImageSet(self.root, [self.files[i] for i in keep], self.classes,
                        [self.ids[i] for i in keep] if self.ids is not None else None,
                        self.labels[keep] if self.labels is not None else None,
                        [self.digests[i] for i in keep] if self.digests is not None else None,
                        self.skipped + skipped)

    def kept_positions(self) -> np.ndarray:
        """Where this set's files stand in the set as listed (all of it, skipped files included)."""
        return np.setdiff1d(np.arange(len(self) + len(self.skipped)), [s.index for s in self.skipped])


def is_image_file(path: Path) -> bool:
    """An image file: by its name (the extensions the winner's ImageFolder read), else by its content (any format
    Pillow recognises, GIF and TIFF among them, whatever the name). A link whose target is missing counts by its
    name (reading it then fails, with its name)."""
    if path.is_dir():
        return False
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with Image.open(path):  # reads the header only
            return True
    except Exception:  # not an image Pillow knows, or not readable: either way not read as one
        return False


def _images_in(folder: Path, ignored: list[Path]) -> list[Path]:
    """The image files of a folder; its other files are added to `ignored`."""
    images = []
    for path in folder.iterdir():
        if is_image_file(path):
            images.append(path)
        elif not path.is_dir():
            ignored.append(path)
    return images


def warn_ignored(files: list[Path], what: str) -> None:
    """Name the files of an input folder that are not read (not images), so that none is left out in silence."""
    if files:
        names = ", ".join(str(p) for p in natsorted(files, key=str)[:MAX_LISTED_BAD_IMAGES])
        more = f" and {len(files) - MAX_LISTED_BAD_IMAGES} more" if len(files) > MAX_LISTED_BAD_IMAGES else ""
        log.warning("%s: %d file(s) are not images and are not read: %s%s", what, len(files), names, more)


# the challenge's classes (label = index): what its test folder's classes.json holds
CHALLENGE_CLASSES = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]


def read_classes(root: Path) -> list[str]:
    path = Path(root) / "classes.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; the test folder needs classes.json (the class names, label = index)")
    try:
        classes = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); it must be a list of the class names, e.g. "
                        f"{json.dumps(CHALLENGE_CLASSES)}") from e
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise DataError(f"{path}: expected a JSON list of class names (non-empty strings), got {classes!r:.80}")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise DataError(f"{path}: class '{dup}' is listed twice; each class name must appear once (label = index)")
    return classes


def require_folder(path: Path, what: str, hint: str = "") -> None:
    """A DataError unless `path` is a folder: it says whether nothing or a file is there."""
    if path.is_dir():
        return
    found = "a file, not a folder" if path.exists() else "no such folder"
    raise DataError(f"{path}: {found} ({what}){'; ' + hint if hint else ''}")


def load_test_set(root: str | Path, limit: int | None = None) -> ImageSet:
    """`root/<sub-folder>/<id>.jpg` + `root/classes.json`, in natural order of the paths (the winner's order)."""
    root = Path(root)
    require_folder(root, "data.test", "`make data` downloads the challenge set")
    classes = read_classes(root)
    ignored = [p for p in root.iterdir() if not p.is_dir() and p.name != "classes.json"]
    files = natsorted((p for sub in root.iterdir() if sub.is_dir() for p in _images_in(sub, ignored)), key=str)
    warn_ignored(ignored, "data.test")
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
    require_folder(root, "data.dev.path", "`make dev-demo` builds the demo's small dev set in data/dev-demo, "
                   "`make dev-data` the full one in data/dev")
    folders = natsorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root}: no class folders in the dev folder")
    class_map = class_map or {}
    per_class, ignored = [], []
    for name in folders:
        target = class_map.get(name, name)
        if target not in classes:
            raise DataError(f"{root}/{name}: folder maps to '{target}', not one of {', '.join(classes)}; "
                            "add it to data.dev.class_map")
        per_class.append((classes.index(target), natsorted(_images_in(root / name, ignored), key=str)))
    empty = [folders[i] for i, (_, images) in enumerate(per_class) if not images]
    if empty:
        raise DataError(f"{root}: no images in the class folder(s) {', '.join(empty)} (image files: "
                        f"{', '.join(IMAGE_EXTENSIONS)}, or any other Pillow reads); add images or remove the folder")
    warn_ignored(ignored, "data.dev.path")
    unused = set(class_map) - set(folders)
    if unused:
        raise DataError(f"{root}: data.dev.class_map names '{sorted(unused)[0]}', which is not a folder there")
    pairs = [(p, c) for c, images in per_class for p in images]
    if limit is not None and limit < len(pairs):
        rounds = max(len(images) for _, images in per_class)
        pairs = [(images[r], c) for r in range(rounds) for c, images in per_class if r < len(images)][:limit]
        pairs = natsorted(pairs, key=lambda pc: (folders.index(pc[0].parent.name), pc[0].name))
    return ImageSet(root, [p for p, _ in pairs], classes, labels=np.array([c for _, c in pairs], dtype=np.int64))


def content_digest(blob: bytes) -> str:
    """The content key of an image file: the embedding cache and the fingerprints use it."""
    return hashlib.sha1(blob).hexdigest()


def file_digest(path: Path) -> str:
    return content_digest(Path(path).read_bytes())


def image_problem(blob: bytes) -> str | None:
    """Why these bytes cannot be used as an image, or None when they decode.

    JPEGs decode at 1/8 scale (libjpeg's DCT scaling): the same entropy decoding as a full decode, so a truncated or
    broken file fails the same way, for a fraction of the cost on large photos.
    """
    if not blob:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        return "not an image (Pillow recognises no image format in it)"
    except Image.DecompressionBombError as e:
        return f"too many pixels to decode safely: {e}"
    except Exception as e:  # whatever a decoder raises (OSError, SyntaxError, ValueError, ...), the file is unusable
        return f"cannot be decoded: {e}"
    return None


def _read_and_check(path: Path, known_good: Container[str]) -> tuple[str | None, str | None]:
    try:
        blob = path.read_bytes()
    except OSError as e:
        return None, f"cannot read the file: {describe_os_error(e).removeprefix(f'{e.filename}: ')}"
    digest = content_digest(blob)
    return digest, None if digest in known_good else image_problem(blob)


def scan_images(files: list[Path], known_good: Container[str] = (), progress: bool = False,
                desc: str = "check images") -> list[tuple[str | None, str | None]]:
    """(content digest, problem) of each file: every file is read once, and decoded unless its digest is known to
    decode. Threads overlap reading, hashing and decoding (Pillow and hashlib release the GIL)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(lambda p: _read_and_check(p, known_good), files), total=len(files), unit="img",
                         desc=desc, disable=not progress))


MAX_LISTED_BAD_IMAGES = 20


def bad_images_message(bad: list[tuple[Path, str]], total: int, consequence: str, remedy: str) -> str:
    """One line: how many of `total` images cannot be used, the first 20 with their reasons, and what to do."""
    listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:MAX_LISTED_BAD_IMAGES])
    more = f"; and {len(bad) - MAX_LISTED_BAD_IMAGES} more" if len(bad) > MAX_LISTED_BAD_IMAGES else ""
    return f"{len(bad)} of {total} images cannot be used, {consequence}: {listed}{more}. Replace or remove them{remedy}"


def require_usable(files: list[Path], progress: bool = False) -> None:
    """A DataError listing every file that cannot be used, before any work on them."""
    problems = scan_images(files, progress=progress)
    bad = [(p, problem) for p, (_, problem) in zip(files, problems) if problem is not None]
    if bad:
        raise DataError(bad_images_message(bad, len(files), "so nothing was done", ""))


def open_image(path: Path) -> Image.Image:
    """A decoded image, or a DataError that names the file and says what is wrong with it."""
    blob = Path(path).read_bytes()  # an OSError (no permission, a folder) names the path itself
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
        return img
    except MemoryError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read this image ({image_problem(blob) or e}); replace or remove it") from e


def fingerprint(image_set: ImageSet, digests: list[str] | None = None) -> dict:
    """What identifies the data of a run: count, and a hash over relative paths, contents and labels."""
    digests = digests or [file_digest(p) for p in image_set.files]
    h = hashlib.sha256()
    labels = image_set.labels if image_set.labels is not None else [None] * len(image_set)
    for p, d, y in zip(image_set.files, digests, labels):
        h.update(f"{p.relative_to(image_set.root)}\t{d}\t{y}\n".encode())
    return {"root": str(image_set.root), "images": len(image_set), "sha256": h.hexdigest()}
