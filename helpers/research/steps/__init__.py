"""Preprocessing as an ordered list of registered steps (`STEPS`), then to a tensor normalised by the model's mean and
std.

A step is a frozen dataclass registered by name (`@register_step("sharpen")`): its fields are its parameters (a
config names them as `{sharpen: {factor: 2.3}}` and they are checked like the config's own keys), `check` says which
values it takes, calling it transforms a PIL image, and `key` is its part of the embedding cache's key, built from
its name and every field, so that a step's cached embeddings can never be reused for other settings. A new step is
a module in this package with one registered class.

The configs' `sharpness: 2.3` is the shorthand for the winner's steps (resize, center crop, RGB, sharpen); a view of
exactly those steps keeps the cache key that the workbench wrote before steps existed (`Preprocess.key`), so older
caches are still hit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ...registry import Registry

STEPS = Registry("preprocessing step", __name__)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def register_step(name: str):
    """A class decorator: `name` is the step's name in configs and in its cache key."""
    return STEPS.register_class(name)


@dataclass(frozen=True)
class Step:
    """One preprocessing step: a PIL image in, a PIL image out."""

    name: ClassVar[str]
    sets_size: ClassVar[bool] = False  # resize and crop: a view that names one of them orders every step itself

    def check(self, where: str, fail) -> None:
        """Call `fail(message)` for a parameter value the step does not take; `where` names the step in the config."""

    def for_model(self, size: int) -> Step:
        """This step with the model's input size filled in where the config left it out."""
        return self

    @property
    def wants_blur(self) -> bool:
        """Whether a parameter says `auto`: the run's estimated blur, which `with_blur` fills in."""
        return False

    def with_blur(self, sigma_px: float) -> Step:
        """This step with the run's estimated blur (px) filled in where a parameter says `auto`."""
        return self

    def key(self) -> dict:
        return {"step": self.name, **dataclasses.asdict(self)}

    def __call__(self, img):
        raise NotImplementedError


# the cache key's recipe of the winner's steps, as written before steps existed (see Preprocess.key)
CLASSIC_RECIPE = "resize-bicubic/center-crop/rgb/adjust-sharpness/normalize"


@dataclass(frozen=True)
class Preprocess:
    """One view of a model's preprocessing: the steps in order, then ToTensor and Normalize(mean, std)."""

    size: int
    steps: tuple[Step, ...]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def transform(self):
        """The torchvision transform: a PIL image in, a normalised (3, size, size) float32 tensor out."""
        import torchvision.transforms as T  # on first use: torchvision takes a second to import

        return T.Compose([*self.steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def classic_sharpness(self) -> float | None:
        """The sharpening factor when the steps are exactly the winner's (resize, crop, RGB, sharpen unless the
        factor is 1), else None."""
        from .standard import RGB, CenterCrop, Resize, Sharpen

        head, tail = self.steps[:3], self.steps[3:]
        if head != (Resize(self.size), CenterCrop(self.size), RGB()):
            return None
        if not tail:
            return 1.0
        if len(tail) == 1 and isinstance(tail[0], Sharpen) and tail[0].factor != 1.0:
            return tail[0].factor
        return None

    def key(self) -> dict:
        """What the embedding cache keys these pixels by: the winner's steps keep the key written before steps
        existed (a recipe string and the factor); any other list is keyed by each step's own key, in order."""
        sharpness = self.classic_sharpness()
        if sharpness is not None:
            return {"recipe": CLASSIC_RECIPE, "size": self.size, "sharpness": sharpness, "mean": list(self.mean),
                    "std": list(self.std)}
        return {"steps": [step.key() for step in self.steps], "size": self.size, "mean": list(self.mean),
                "std": list(self.std)}

    def describe(self) -> str:
        return describe(self.key())


def describe(key: dict) -> str:
    """A short name of a view for progress bars and tables, from its cache key (`Preprocess.key`, which model.json
    records): `sharpness 2.3`, or the steps other than the resize, the crop and RGB."""
    if "recipe" in key:
        return f"sharpness {key['sharpness']:g}"
    return " > ".join(s["step"] for s in key["steps"] if s["step"] not in ("resize", "center_crop", "rgb")) or "plain"


def default_head() -> list[Step]:
    """The steps every view starts with unless it orders them itself: resize and crop to the model's size, RGB."""
    from .standard import RGB, CenterCrop, Resize

    return [Resize(), CenterCrop(), RGB()]


def apply_steps(steps: list[Step], img):
    """`img` through `steps`, in order (a view's steps without its ToTensor and Normalize: for figures and the
    restoration table)."""
    for step in steps:
        img = step(img)
    return img


def sharpened(factor: float) -> list[Step]:
    """The `sharpness` shorthand's steps after the head: sharpen, unless the factor is 1 (unchanged)."""
    from .standard import Sharpen

    return [] if factor == 1.0 else [Sharpen(factor)]


def view(steps: list[Step], size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> Preprocess:
    """The view of `steps` for a model of input `size`: after the default head, unless the steps set the size
    themselves (then they are the whole list, in their order)."""
    whole = steps if any(step.sets_size for step in steps) else [*default_head(), *steps]
    return Preprocess(size, tuple(step.for_model(size) for step in whole), tuple(mean), tuple(std))
