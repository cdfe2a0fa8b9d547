"""The challenge's degradation, and a reference-free estimate of how much Gaussian blur a set of images carries.

Estimation works on the radial power spectrum. A natural image's power falls as a power law, k^-alpha with alpha
near 2, and a Gaussian blur of sigma pixels multiplies it by exp(-(2 pi sigma k / n)^2). So over the band where the
image stands above its noise floor, log P(k) = c - alpha log k - beta k^2 with sigma = n sqrt(beta) / (2 pi).
The band ends where the spectrum comes within `FLOOR_DECADES` of the high-frequency floor (JPEG and 8-bit
quantisation noise); alpha is held near 2 by a weak prior, which keeps short bands (heavy blur) stable.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

FLOOR_DECADES = 2.0  # the fitted band stays this many decades (x100 in power) above the noise floor
ALPHA_PRIOR, ALPHA_PRIOR_WEIGHT = 2.0, 1.0
SHARP_PX, NATURAL_ALPHA_MAX = 1.5, 3.0  # when the full-spectrum fit is trusted (see estimate_sigma)
# IJG's standard luminance quantisation table (JPEG Annex K), row-major as Pillow reports it
_IJG_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                      92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


def to_gray(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    return image.mean(axis=-1) if image.ndim == 3 else image


def radial_power_spectrum(gray: np.ndarray) -> np.ndarray:
    """Mean power at each integer radius k (cycles per image) of the centre square, Hann-windowed."""
    n = min(gray.shape)
    top, left = (gray.shape[0] - n) // 2, (gray.shape[1] - n) // 2
    g = gray[top:top + n, left:left + n]
    g = g - g.mean()
    window = np.hanning(n)
    power = np.abs(np.fft.fftshift(np.fft.fft2(g * np.outer(window, window)))) ** 2
    y, x = np.indices(power.shape)
    radius = np.hypot(x - n // 2, y - n // 2).round().astype(int).ravel()
    profile = np.bincount(radius, power.ravel()) / np.maximum(np.bincount(radius), 1)
    return profile[: n // 2]


def _band_fit(profile: np.ndarray) -> float:
    """sigma from the band above the noise floor: accurate from about 1.5 px up, under JPEG noise too."""
    n = 2 * len(profile)
    with np.errstate(divide="ignore"):
        log_power = np.log10(profile)
    floor = np.median(log_power[int(0.3 * n):])
    end = 1  # the band starts at k=2 only if k=2 itself is above the floor
    while end + 1 < len(profile) and log_power[end + 1] > floor + FLOOR_DECADES:
        end += 1
    k = np.arange(2, end + 1, dtype=np.float64)
    if len(k) < 3:
        return float("nan")
    signal = np.log(profile[2:end + 1] - 10**floor)
    design = np.stack([np.ones_like(k), -np.log(k), -(k**2)], axis=1)
    prior = math.sqrt(ALPHA_PRIOR_WEIGHT * len(k))
    design = np.vstack([design, [0.0, prior, 0.0]])
    target = np.append(signal, prior * ALPHA_PRIOR)
    (_, _, beta), *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(n * math.sqrt(max(beta, 0.0)) / (2 * math.pi))


def _full_fit(profile: np.ndarray, start_sigma: float) -> tuple[float, float]:
    """sigma from the whole spectrum, with the noise floor as a fitted term: right where the image is sharp (its
    high frequencies are signal, which the band fit would take for the floor), biased low under JPEG noise."""
    from scipy.optimize import least_squares

    n = 2 * len(profile)
    k = np.arange(2, len(profile), dtype=np.float64)
    log_power = np.log(np.maximum(profile[2:], 1e-12))
    prior = 0.3 * math.sqrt(len(k)) * ALPHA_PRIOR_WEIGHT

    def residuals(p):
        c, alpha, beta, floor = p
        model = np.logaddexp(c - alpha * np.log(k) - beta * k * k, floor)
        return np.append(model - log_power, prior * (alpha - ALPHA_PRIOR))

    start = [log_power[0] + ALPHA_PRIOR * math.log(2), ALPHA_PRIOR, min((2 * math.pi * start_sigma / n) ** 2, 0.5),
             math.log(np.median(profile[int(0.3 * n):]))]
    fit = least_squares(residuals, start, bounds=([-np.inf, 0, 0, -np.inf], [np.inf, 5, 1, np.inf]),
                        loss="soft_l1", f_scale=0.5)
    return float(n * math.sqrt(fit.x[2]) / (2 * math.pi)), float(fit.x[1])


def estimate_sigma(image: Image.Image | np.ndarray) -> float:
    """Gaussian blur sigma in pixels at the image's own size; NaN for an image too flat to measure.

    The band fit is the estimate; the full-spectrum fit decides whether there is a blur roll-off to measure at all:
    when it reads less than SHARP_PX with a natural power law (alpha <= NATURAL_ALPHA_MAX; a blurred image can
    also be fitted as "sharp" but only with an unnaturally steep alpha), the image is sharp and the band fit, which
    would take its high frequencies for noise, is not used."""
    profile = radial_power_spectrum(to_gray(image))
    if not np.isfinite(profile).all() or profile[2:].max() <= 0:
        return float("nan")
    band = _band_fit(profile)
    full, alpha = _full_fit(profile, band if np.isfinite(band) else 1.0)
    sharp = full < SHARP_PX and alpha <= NATURAL_ALPHA_MAX
    return full if sharp or not np.isfinite(band) else band


def jpeg_quality(path: str | Path) -> int | None:
    """The IJG quality whose scaled standard table is nearest to the file's luminance table (None if not JPEG)."""
    with Image.open(path) as img:
        tables = getattr(img, "quantization", None)
        if img.format != "JPEG" or not tables:
            return None
        luma = np.array(tables[0], dtype=np.float64)

    def table(q: int) -> np.ndarray:
        scale = 5000 / q if q < 50 else 200 - 2 * q
        return np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)

    return int(min(range(1, 101), key=lambda q: np.abs(table(q) - luma).sum()))


def gaussian_kernel_size(sigma: float) -> int:
    """An odd kernel that holds the Gaussian out to 4 sigma (scipy's default truncation)."""
    return 2 * math.ceil(4 * sigma) + 1


def degrade_bytes(image: Image.Image, sigma: float, quality: int | None, size: int = 224,
                  kernel_size: int | None = None) -> bytes:
    """The challenge's degradation as a file: bicubic resize to size x size, Gaussian blur, one JPEG encode at
    `quality` (PNG when quality is None)."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    if sigma > 0:
        from scipy import ndimage  # here: every config's check imports this module (the restoration steps use it)

        # separable, so a 4-sigma kernel costs O(k) per pixel; 'mirror' is torchvision's reflect padding
        radius = (kernel_size or gaussian_kernel_size(sigma)) // 2
        pixels = np.asarray(image, dtype=np.float32)
        blurred = ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0), mode="mirror", truncate=radius / sigma)
        image = Image.fromarray(np.clip(np.rint(blurred), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG") if quality is None else image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def degrade(image: Image.Image, sigma: float, quality: int | None, size: int = 224,
            kernel_size: int | None = None) -> Image.Image:
    """`degrade_bytes`, decoded: the image as a model would read it from disk."""
    return Image.open(io.BytesIO(degrade_bytes(image, sigma, quality, size, kernel_size)))


def calibrate_sigma(images: list[Image.Image], target: float, quality: int | None, size: int = 224,
                    kernel_size: int | None = None, low: float = 0.0, high: float = 20.0, tol: float = 0.02) -> float:
    """The sigma whose degradation of `images` gives a median estimated blur of `target` (bisection: the
    estimate grows with sigma)."""

    def measured(sigma: float) -> float:
        return float(np.nanmedian([estimate_sigma(degrade(im, sigma, quality, size, kernel_size)) for im in images]))

    if measured(high) < target:
        raise ValueError(f"cannot reach an estimated blur of {target:.2f} px with sigma <= {high}")
    while high - low > tol:
        mid = (low + high) / 2
        low, high = (mid, high) if measured(mid) < target else (low, mid)
    return round((low + high) / 2, 2)


def blur_summary(sigmas) -> dict:
    sigmas = np.asarray(sigmas, dtype=np.float64)
    ok = sigmas[~np.isnan(sigmas)]
    if ok.size == 0:
        return {"images": int(sigmas.size), "measured": 0, "median": float("nan")}
    p10, p25, p50, p75, p90 = np.percentile(ok, [10, 25, 50, 75, 90])
    return {"images": int(sigmas.size), "measured": int(ok.size), "median": float(p50), "mean": float(ok.mean()),
            "p10": float(p10), "p25": float(p25), "p75": float(p75), "p90": float(p90)}
