"""The winner's steps (SPEC 1, step 2): squash-resize, center crop, RGB, sharpen."""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import Step, register_step


@dataclass(frozen=True)
class SizedStep(Step):
    """A step that sets the image's size (size x size pixels): the model's input size unless the config gives one."""

    size: int | None = None
    sets_size = True

    def check(self, where, fail):
        if self.size is not None and not 1 <= self.size <= 8192:
            fail(f"{where}.size must be between 1 and 8192 (or absent: the model's input size), got {self.size}")

    def for_model(self, size):
        return self if self.size is not None else replace(self, size=size)


@register_step("resize")
@dataclass(frozen=True)
class Resize(SizedStep):
    """Bicubic resize to size x size, whatever the aspect ratio (the winner's squash)."""

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        return TF.resize(img, [self.size, self.size], interpolation=TF.InterpolationMode.BICUBIC)


@register_step("center_crop")
@dataclass(frozen=True)
class CenterCrop(SizedStep):
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
