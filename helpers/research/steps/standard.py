"""The winner's steps (SPEC 1, step 2): squash-resize, center crop, RGB, sharpen."""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import Step, register_step


def _size(step, where, fail):
    if step.size is not None and not 1 <= step.size <= 8192:
        fail(f"{where}.size must be between 1 and 8192 (or absent: the model's input size), got {step.size}")


@register_step("resize")
@dataclass(frozen=True)
class Resize(Step):
    """Bicubic resize to size x size, whatever the aspect ratio (the winner's squash)."""

    size: int | None = None  # default: the model's input size
    sets_size = True

    def check(self, where, fail):
        _size(self, where, fail)

    def for_model(self, size):
        return self if self.size is not None else replace(self, size=size)

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        return TF.resize(img, [self.size, self.size], interpolation=TF.InterpolationMode.BICUBIC)


@register_step("center_crop")
@dataclass(frozen=True)
class CenterCrop(Step):
    size: int | None = None  # default: the model's input size
    sets_size = True

    def check(self, where, fail):
        _size(self, where, fail)

    def for_model(self, size):
        return self if self.size is not None else replace(self, size=size)

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        return TF.center_crop(img, [self.size, self.size])


@register_step("rgb")
@dataclass(frozen=True)
class RGB(Step):
    """Three channels, whatever the file's mode (greyscale, palette, RGBA)."""

    def __call__(self, img):
        return img.convert("RGB")


@register_step("sharpen")
@dataclass(frozen=True)
class Sharpen(Step):
    """RandomAdjustSharpness(factor, p=1) as the winner used it: always adjust_sharpness(factor), a 3x3 kernel
    blended with the image (1.0: unchanged)."""

    factor: float = 1.0

    def check(self, where, fail):
        if not 0 <= self.factor <= 100:
            fail(f"{where}.factor must be between 0 and 100, got {self.factor}")

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        return TF.adjust_sharpness(img, self.factor)
