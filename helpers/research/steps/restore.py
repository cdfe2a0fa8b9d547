"""Restoring the measured blur: non-blind deconvolution with a Gaussian point-spread function (Wiener,
Richardson-Lucy), and unsharp masking.

The challenge's images were blurred by one Gaussian (`helpers.research.blur` measures about 6.3 px at 224), so the
point-spread function (PSF) is known up to its sigma: the sampled, normalised Gaussian that `blur.degrade` blurs with,
out to 4 sigma. A step's `sigma` is a number (px at the image's size when the step runs), or `auto`: the run's
estimated blur (the test set's, `helpers.runs.pipeline.resolve_auto_blur`), filled in once when the run loads its
images and recorded in the run; until then the step cannot transform an image, and its cache key says `auto`, so no
embedding is ever stored under an unresolved sigma.

Deconvolution by FFT treats the image as periodic: the right edge wraps onto the left, and the jump there rings
across the image. `edges: mirror` (the default) filters the image continued by its mirror image about every edge
instead, on its DCT, where nothing jumps; `edges: periodic` is the plain FFT filter (`python -m helpers.bench
restoration` measures what it costs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ..blur import gaussian_kernel_size
from . import Step, register_step

AUTO = "auto"  # sigma: the run's estimated blur, filled in by `with_blur`
MAX_SIGMA = 50.0
EDGES = ("mirror", "periodic")  # the image past its edges: its mirror image (DCT), or its opposite edge (FFT)


def to_channels(img: Image.Image) -> np.ndarray:
    """(channels, height, width) float32 in [0, 1], C-contiguous (the transforms take twice as long on a strided
    view); a mode other than L or RGB is read as RGB."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    pixels = np.asarray(img)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    channels = pixels.astype(np.float32, order="C")
    channels *= np.float32(1 / 255)
    return channels


def to_image(channels: np.ndarray) -> Image.Image:
    """The inverse of `to_channels`: values clipped to [0, 1], rounded to 8 bits (the channels merged by PIL, which
    is faster than numpy's transposing copy)."""
    levels = channels * np.float32(255)
    np.clip(levels, 0, 255, out=levels)
    bands = [Image.fromarray(band) for band in np.rint(levels, out=levels).astype(np.uint8)]
    return bands[0] if len(bands) == 1 else Image.merge("RGB", bands)


def gaussian_psf_1d(sigma: float) -> np.ndarray:
    """The normalised, sampled Gaussian of `blur.degrade` (radius 4 sigma, rounded up), float64; the PSF is its outer
    product with itself (the blur is separable)."""
    radius = gaussian_kernel_size(sigma) // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def gaussian_psf(sigma: float) -> np.ndarray:
    g = gaussian_psf_1d(sigma)
    return np.outer(g, g)


def _centred_dft(kernel_1d: np.ndarray, n: int, real: bool) -> np.ndarray:
    """The DFT over n samples of a centred odd 1-D kernel, its centre at index 0 and the rest wrapped around (what
    skimage's `uft.ir2tf` does by rolling the zero-padded kernel)."""
    wrapped = np.zeros(n)
    radius = len(kernel_1d) // 2
    np.add.at(wrapped, np.arange(-radius, radius + 1) % n, kernel_1d)
    return np.fft.rfft(wrapped) if real else np.fft.fft(wrapped)


def _spectra(shape: tuple[int, int], sigma: float, edges: str) -> tuple[np.ndarray, np.ndarray]:
    """The PSF's and the discrete Laplacian's transfer functions on the grid that `edges` filters on: rfft2's
    half-spectrum of the image (periodic), or the DCT-II's (height, width) coefficients (mirror), which are the
    DFT's over the mirrored image of twice the size at its first height x width frequencies.

    The PSF is separable and symmetric, so H(u, v) = h(u) h(v) is real; the Laplacian [[0,-1,0],[-1,4,-1],[0,-1,0]]
    has L(u, v) = 4 - 2 cos(2 pi u) - 2 cos(2 pi v), u and v in cycles per sample."""
    height, width = shape
    g = gaussian_psf_1d(sigma)
    if edges == "mirror":
        h = np.outer(_centred_dft(g, 2 * height, real=True)[:height], _centred_dft(g, 2 * width, real=True)[:width])
        u, v = np.arange(height)[:, None] / (2 * height), np.arange(width)[None, :] / (2 * width)
    else:
        h = np.outer(_centred_dft(g, height, real=False), _centred_dft(g, width, real=True))
        u, v = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    return h.real, 4 - 2 * np.cos(2 * np.pi * u) - 2 * np.cos(2 * np.pi * v)


@functools.lru_cache(maxsize=16)
def psf_transfer(shape: tuple[int, int], sigma: float, edges: str, dtype: str = "float32") -> np.ndarray:
    """H of `_spectra`, computed once per image size and setting."""
    return _spectra(shape, sigma, edges)[0].astype(dtype)


@functools.lru_cache(maxsize=16)
def wiener_transfer(shape: tuple[int, int], sigma: float, balance: float, edges: str,
                    dtype: str = "float32") -> np.ndarray:
    """The Wiener-Hunt filter W = conj(H) / (|H|^2 + balance |L|^2) of scikit-image's `restoration.wiener` (after
    Orieux et al., JOSA A 27, 1593 (2010); Hunt, IEEE Trans. Audio Electroacoust. 19, 285 (1971)), with H the
    Gaussian PSF's transfer function and L the Laplacian's (`_spectra`), computed once per image size and setting.
    H is real, so W is too, and filtering a spectrum is one real product per value."""
    h, laplacian = _spectra(shape, sigma, edges)
    return (h / (h * h + balance * laplacian * laplacian)).astype(dtype)


def _forward(channels: np.ndarray, edges: str) -> np.ndarray:
    import scipy.fft

    return scipy.fft.dctn(channels, type=2, axes=(1, 2)) if edges == "mirror" else scipy.fft.rfft2(channels)


def _inverse(spectrum: np.ndarray, shape: tuple[int, int], edges: str) -> np.ndarray:
    import scipy.fft

    return scipy.fft.idctn(spectrum, type=2, axes=(1, 2)) if edges == "mirror" else scipy.fft.irfft2(spectrum, s=shape)


def wiener_deconvolve(channels: np.ndarray, sigma: float, balance: float, edges: str) -> np.ndarray:
    """Wiener-Hunt deconvolution of (channels, height, width) values in [0, 1], unclipped, in their dtype: the
    image's spectrum times the precomputed filter (`wiener_transfer`), transformed back.

    With `edges: mirror` the spectrum is the DCT-II: filtering it is filtering the image mirrored about each edge
    (numpy's `symmetric` extension, repeated), since a symmetric PSF maps a mirror-symmetric image to a mirror-symmetric
    image (reflexive boundary conditions: Hansen, Nagy & O'Leary, "Deblurring Images", SIAM 2006, ch. 4). The
    image meets its mirror image at every edge, so there is no jump to ring, and a DCT of the image costs about what an
    FFT of it padded by a quarter would. `periodic`: rfft2, the image's right edge wrapped onto its left."""
    shape = channels.shape[1:]
    spectrum = _forward(channels, edges)
    spectrum *= wiener_transfer(shape, sigma, balance, edges, np.dtype(channels.dtype).name)
    return _inverse(spectrum, shape, edges)


def richardson_lucy_deconvolve(channels: np.ndarray, sigma: float, iterations: int, edges: str) -> np.ndarray:
    """Richardson-Lucy deconvolution (Richardson, JOSA 62, 55 (1972); Lucy, AJ 79, 745 (1974)), scikit-image's
    `restoration.richardson_lucy` update u <- u * (P' * (d / (P * u + 1e-12))) from a flat 0.5, P the PSF and
    P' = P its mirror image (the Gaussian is symmetric). The convolutions are products with the PSF's transfer
    function on the spectrum of `edges` (as in `wiener_deconvolve`): scikit-image's own pad the image with zeros,
    which darkens its edges, and every update carries that a PSF's radius further in."""
    shape = channels.shape[1:]
    transfer = psf_transfer(shape, sigma, edges, np.dtype(channels.dtype).name)

    def blur(u: np.ndarray) -> np.ndarray:
        spectrum = _forward(u, edges)
        spectrum *= transfer
        return _inverse(spectrum, shape, edges)

    estimate = np.full_like(channels, 0.5)
    for _ in range(iterations):
        estimate *= blur(channels / (blur(estimate) + 1e-12))
    return estimate


@dataclass(frozen=True)
class GaussianDeconvolution(Step):
    """A deconvolution with the Gaussian PSF of `sigma` px (`auto`: the run's estimated blur), the image continued
    past its edges by its mirror image (`mirror`) or by its opposite edge (`periodic`)."""

    sigma: float | str = AUTO
    edges: str = "mirror"

    def check(self, where, fail):
        if isinstance(self.sigma, str) and self.sigma != AUTO:
            fail(f"{where}.sigma must be a number of px or 'auto' (the run's estimated blur), got {self.sigma!r}")
        if not isinstance(self.sigma, str) and not 0 < self.sigma <= MAX_SIGMA:
            fail(f"{where}.sigma must be between 0 (excluded) and {MAX_SIGMA:g} px, got {self.sigma}")
        if self.edges not in EDGES:
            fail(f"{where}.edges must be one of {', '.join(EDGES)}, got {self.edges!r}")

    @property
    def wants_blur(self) -> bool:
        return self.sigma == AUTO

    def with_blur(self, sigma_px: float) -> Step:
        return replace(self, sigma=round(float(sigma_px), 2)) if self.wants_blur else self

    def deconvolve(self, channels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, img):
        if self.wants_blur:
            raise ValueError(f"{self.name}: sigma is 'auto' and has not been filled in with the run's estimated blur "
                             "(helpers.runs.pipeline.resolve_auto_blur)")
        return to_image(self.deconvolve(to_channels(img)))


@register_step("wiener")
@dataclass(frozen=True)
class Wiener(GaussianDeconvolution):
    """Non-blind Wiener-Hunt deconvolution (`wiener_transfer`): `balance` weighs the Laplacian regulariser against
    the data (smaller: sharper and noisier)."""

    balance: float = 0.1

    def check(self, where, fail):
        super().check(where, fail)
        if not 0 < self.balance <= 100:
            fail(f"{where}.balance must be between 0 (excluded) and 100, got {self.balance}")

    def deconvolve(self, channels):
        return wiener_deconvolve(channels, self.sigma, self.balance, self.edges)


@register_step("richardson_lucy")
@dataclass(frozen=True)
class RichardsonLucy(GaussianDeconvolution):
    """Richardson-Lucy deconvolution, `iterations` updates (more: sharper, and the JPEG's noise grows)."""

    iterations: int = 10

    def check(self, where, fail):
        super().check(where, fail)
        if not 1 <= self.iterations <= 1000:
            fail(f"{where}.iterations must be between 1 and 1000, got {self.iterations}")

    def deconvolve(self, channels):
        return richardson_lucy_deconvolve(channels, self.sigma, self.iterations, self.edges)


@register_step("unsharp_mask")
@dataclass(frozen=True)
class UnsharpMask(Step):
    """Unsharp masking, scikit-image's `filters.unsharp_mask`: image + amount * (image - Gaussian(image, radius)),
    radius the Gaussian's sigma in px (edges: nearest), clipped to [0, 1]."""

    radius: float = 2.0
    amount: float = 1.0

    def check(self, where, fail):
        if not 0 < self.radius <= MAX_SIGMA:
            fail(f"{where}.radius must be between 0 (excluded) and {MAX_SIGMA:g} px, got {self.radius}")
        if not 0 <= self.amount <= 100:
            fail(f"{where}.amount must be between 0 and 100, got {self.amount}")

    def __call__(self, img):
        from skimage.filters import unsharp_mask

        channels = to_channels(img)
        return to_image(unsharp_mask(channels, radius=self.radius, amount=self.amount, channel_axis=0))

