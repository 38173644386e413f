"""Common image corruptions for robustness fine-tuning, on batched [0, 1] tensors.

Two families of operators, chosen with `--corruptions` in robust.py:

- "proxy": the four operators that "Post-Training Strains Diffusion Models: A Stability Analysis of
  Distillation, Robustness, and Unlearning" (Bharadwaj, Liu and Zheng) trains with (its Appendix D,
  Table 8 and eq. 12-15). They are defined at severity 3 only.
- "cifar10c": the CIFAR-10-C operators of Hendrycks & Dietterich 2019 (arXiv 1903.12261), with the
  parameter tables of `make_cifar_c.py` in github.com/hendrycks/robustness, at severities 1-5.

Both families name their operators after the corruption they stand for, so `fog` in the proxy
family is the brightness shift of Appendix D.5 and `fog` in the CIFAR-10-C family is the plasma
fractal. The training protocol (Appendix D.3) keeps an image clean with probability 0.2 and
otherwise applies one of gaussian_noise, defocus_blur, fog and jpeg_compression, chosen uniformly,
at severity 3.

Images are float tensors (B, 3, H, W) in [0, 1]. Every random draw comes from the
`torch.Generator` passed in, never from the global RNG, so a seed reproduces a batch exactly.

    python corruptions.py grid --data $DDPM_DATA --out corruption_grid.png
"""

import argparse
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from data import DATASETS, load_dataset
from logs import HelpFormatter

# ---------------------------------------------------------------- parameter tables

# Appendix D, Table 8 and D.5 of the study: every proxy is defined at severity 3 only.
PROXY_SEVERITY = 3
PROXY_NOISE_SIGMA = 0.18  # eq. 12, Gaussian noise std in [0, 1] pixel units
PROXY_BLUR_SIGMA = 3.0  # eq. 13, Gaussian blur std in pixels (stands for defocus blur)
PROXY_FOG_SHIFT = 0.3  # eq. 14, alpha added to every pixel (stands for fog)
PROXY_CONTRAST = 0.2  # eq. 15, beta around the image mean (stands for JPEG compression)

# CIFAR-10-C tables, one entry per severity 1-5, from make_cifar_c.py in hendrycks/robustness.
CIFAR10C_SEVERITIES = (1, 2, 3, 4, 5)
CIFAR10C_NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)  # gaussian_noise: std in [0, 1] units
CIFAR10C_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)  # gaussian_blur: std in pixels
CIFAR10C_DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (radius, alias)
CIFAR10C_FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # (amplitude, decay)
CIFAR10C_JPEG_QUALITY = (80, 65, 58, 50, 40)  # Pillow JPEG quality
CIFAR10C_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to the HSV value channel
CIFAR10C_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor around the per-channel mean

# Appendix D.3 of the study: the training protocol.
PROTOCOL_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "jpeg_compression")
PROTOCOL_SEVERITY = 3
CLEAN_PROBABILITY = 0.2
CLEAN = "clean"  # the name `corrupt_randomly` reports for an image left unchanged

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


# ---------------------------------------------------------------- shared helpers


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Draw standard normal noise on the generator's device, then move it to `like`'s device."""
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def _check_severity(name: str, severity: int, allowed: tuple[int, ...]) -> None:
    if severity not in allowed:
        raise ValueError(f"severity {severity!r} is invalid for {name}: use one of {list(allowed)}")


def _check_proxy_severity(name: str, severity: int) -> None:
    if severity != PROXY_SEVERITY:
        raise ValueError(
            f"severity {severity!r} is invalid for the proxy {name}: the proxies are defined at "
            f"severity {PROXY_SEVERITY} only. Use the cifar10c family for severities 1-5"
        )


def _gaussian_kernel_1d(sigma: float, radius: int) -> torch.Tensor:
    """Sample exp(-i^2 / (2 sigma^2)) at i = -radius..radius and normalize it to sum 1."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _filter2d(x: torch.Tensor, kernel: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Correlate every channel of `x` (B, C, H, W) with a 2D `kernel` of odd size (kh, kw)."""
    kh, kw = kernel.shape
    pad_h, pad_w = kh // 2, kw // 2
    height, width = x.shape[-2:]
    if padding_mode == "reflect" and (pad_h >= height or pad_w >= width):
        raise ValueError(
            f"image size {height}x{width} is too small for a {kh}x{kw} kernel with reflect "
            f"padding: use images larger than {max(pad_h, pad_w)} pixels per side"
        )
    channels = x.shape[1]
    weight = kernel.to(dtype=x.dtype, device=x.device).expand(channels, 1, kh, kw)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=padding_mode)
    return F.conv2d(padded, weight, groups=channels)


def _separable_blur(x: torch.Tensor, kernel_1d: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Blur along width, then height, with the same 1D kernel (a separable 2D kernel)."""
    x = _filter2d(x, kernel_1d.view(1, -1), padding_mode)
    return _filter2d(x, kernel_1d.view(-1, 1), padding_mode)


# ---------------------------------------------------------------- proxy operators (Appendix D)


def proxy_gaussian_noise(
    x: torch.Tensor, severity: int, generator: torch.Generator
) -> torch.Tensor:
    """Add N(0, 0.18^2) noise to every pixel and clip to [0, 1] (study, eq. 12)."""
    _check_proxy_severity("gaussian_noise", severity)
    return (x + PROXY_NOISE_SIGMA * _randn(x.shape, generator, x)).clamp(0, 1)


def proxy_defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Blur with a Gaussian of sigma 3 px, the study's proxy for defocus blur (eq. 13).

    The kernel samples eq. 13 at integer offsets up to radius ceil(3 sigma) = 9 (a 19x19 kernel,
    applied separably) and is normalized to sum 1, so a flat image stays flat. Borders use reflect
    padding without repeating the edge pixel (dcb|abcd|cba), so images need at least 10 pixels per
    side. The output is clipped to [0, 1] because float rounding can exceed 1 by a few ulp.
    """
    _check_proxy_severity("defocus_blur", severity)
    kernel = _gaussian_kernel_1d(PROXY_BLUR_SIGMA, math.ceil(3 * PROXY_BLUR_SIGMA))
    return _separable_blur(x, kernel, "reflect").clamp(0, 1)


def proxy_fog(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add 0.3 to every pixel and clip to [0, 1], the study's proxy for fog (eq. 14)."""
    _check_proxy_severity("fog", severity)
    return (x + PROXY_FOG_SHIFT).clamp(0, 1)


def proxy_jpeg_compression(
    x: torch.Tensor, severity: int, generator: torch.Generator
) -> torch.Tensor:
    """Scale contrast by 0.2 around the image mean and clip, the study's JPEG proxy (eq. 15).

    The mean mu is one number per image, over all pixels and channels ("the mean pixel value of
    the image" in eq. 15), unlike CIFAR-10-C's contrast, which uses one mean per channel.
    """
    _check_proxy_severity("jpeg_compression", severity)
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    return (PROXY_CONTRAST * (x - mu) + mu).clamp(0, 1)


# ---------------------------------------------------------------- CIFAR-10-C operators


def cifar10c_gaussian_noise(
    x: torch.Tensor, severity: int, generator: torch.Generator
) -> torch.Tensor:
    """Add Gaussian noise of the CIFAR-10-C std for `severity` and clip to [0, 1]."""
    _check_severity("gaussian_noise", severity, CIFAR10C_SEVERITIES)
    sigma = CIFAR10C_NOISE_SIGMA[severity - 1]
    return (x + sigma * _randn(x.shape, generator, x)).clamp(0, 1)


def cifar10c_gaussian_blur(
    x: torch.Tensor, severity: int, generator: torch.Generator
) -> torch.Tensor:
    """Blur with a Gaussian of the CIFAR-10-C sigma for `severity`.

    make_cifar_c.py calls skimage.filters.gaussian with its defaults, which run
    scipy.ndimage.gaussian_filter with truncate=4 and mode="nearest". So the kernel radius is
    int(4 sigma + 0.5) and the border repeats the edge pixel (aaa|abcd|ddd).
    """
    _check_severity("gaussian_blur", severity, CIFAR10C_SEVERITIES)
    sigma = CIFAR10C_BLUR_SIGMA[severity - 1]
    kernel = _gaussian_kernel_1d(sigma, int(4 * sigma + 0.5))
    return _separable_blur(x, kernel, "replicate").clamp(0, 1)


def defocus_kernel(radius: float, alias_sigma: float) -> torch.Tensor:
    """Build the CIFAR-10-C defocus kernel: an anti-aliased disk of `radius` pixels, sum 1.

    As in make_cifar_c.py, the disk is the set of integer offsets within `radius` on a 17x17 grid
    (offsets -8..8, which covers every radius up to 8). It is normalized and then smoothed by a 3x3
    Gaussian of std `alias_sigma` with reflect-101 borders (OpenCV GaussianBlur). The result is
    cropped to its nonzero rows and columns, which changes no output value.
    """
    if not 0 < radius <= 8:
        raise ValueError(f"defocus radius {radius!r} is outside (0, 8]: the 17x17 grid covers 8")
    offsets = torch.arange(-8, 9, dtype=torch.float64)
    rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
    disk = (rows**2 + cols**2 <= radius**2).to(torch.float64)
    disk /= disk.sum()

    # Anti-alias the hard disk edge with a 3-tap Gaussian along each axis.
    alias = _gaussian_kernel_1d(alias_sigma, 1)
    kernel = _separable_blur(disk[None, None], alias, "reflect")[0, 0]

    # Crop the zero border so that small images can still use reflect padding.
    nonzero_rows = kernel.abs().sum(dim=1).nonzero()
    nonzero_cols = kernel.abs().sum(dim=0).nonzero()
    half = int(max(8 - nonzero_rows.min(), 8 - nonzero_cols.min()))
    return kernel[8 - half : 9 + half, 8 - half : 9 + half]


def cifar10c_defocus_blur(
    x: torch.Tensor, severity: int, generator: torch.Generator
) -> torch.Tensor:
    """Correlate every channel with the defocus disk kernel and clip to [0, 1].

    The image border uses reflect-101 padding (dcb|abcd|cba), the default of OpenCV's filter2D
    that make_cifar_c.py calls.
    """
    _check_severity("defocus_blur", severity, CIFAR10C_SEVERITIES)
    radius, alias_sigma = CIFAR10C_DEFOCUS[severity - 1]
    return _filter2d(x, defocus_kernel(radius, alias_sigma), "reflect").clamp(0, 1)


def plasma_fractal(batch: int, size: int, decay: float, generator: torch.Generator) -> torch.Tensor:
    """Draw `batch` diamond-square height maps of `size` x `size` in [0, 1], float64.

    `size` must be a power of two. The map wraps around its edges. The random offset at each level
    is wibble * U(-wibble, wibble), where wibble starts at 100 and is divided by `decay` after every
    level, so a larger decay gives a smoother map. Each map is then shifted and scaled to [0, 1].
    These are the rules of plasma_fractal in make_cifar_c.py, with one map per image.
    """
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma fractal size {size} is not a power of two >= 2")
    height_map = torch.zeros(batch, size, size, dtype=torch.float64, device=generator.device)
    step = size
    wibble = 100.0

    def wibbled_mean(neighbour_sum: torch.Tensor) -> torch.Tensor:
        offsets = torch.rand(
            neighbour_sum.shape, generator=generator, device=generator.device, dtype=torch.float64
        )
        return neighbour_sum / 4 + wibble * (2 * offsets - 1) * wibble

    while step >= 2:
        half = step // 2

        # Square step: each square centre gets the mean of its four corners.
        corners = height_map[:, ::step, ::step]
        corner_sum = corners + corners.roll(-1, dims=1)
        corner_sum = corner_sum + corner_sum.roll(-1, dims=2)
        height_map[:, half::step, half::step] = wibbled_mean(corner_sum)

        # Diamond step: each edge midpoint gets the mean of its two corners and two centres.
        centres = height_map[:, half::step, half::step]
        top_sum = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        height_map[:, ::step, half::step] = wibbled_mean(top_sum)
        left_sum = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        height_map[:, half::step, ::step] = wibbled_mean(left_sum)

        step = half
        wibble /= decay

    height_map -= height_map.amin(dim=(1, 2), keepdim=True)
    return height_map / height_map.amax(dim=(1, 2), keepdim=True)


def cifar10c_fog(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add a plasma fractal haze, then rescale by max / (max + amplitude) and clip (CIFAR-10-C).

    The fractal is drawn at the smallest power of two that covers the image and cropped to it, so
    32x32 uses a 32x32 map as in make_cifar_c.py and 256x256 a 256x256 map. The same haze is added
    to all three channels, and max is the maximum pixel of each clean image.
    """
    _check_severity("fog", severity, CIFAR10C_SEVERITIES)
    amplitude, decay = CIFAR10C_FOG[severity - 1]
    batch, _, height, width = x.shape
    size = 1 << (max(height, width, 2) - 1).bit_length()
    haze = plasma_fractal(batch, size, decay, generator)[:, None, :height, :width]
    max_value = x.amax(dim=(1, 2, 3), keepdim=True)
    hazy = x + amplitude * haze.to(device=x.device, dtype=x.dtype)
    return (hazy * max_value / (max_value + amplitude)).clamp(0, 1)


def cifar10c_jpeg_compression(
    x: torch.Tensor, severity: int, generator: torch.Generator
) -> torch.Tensor:
    """Encode each image as JPEG with Pillow at the CIFAR-10-C quality, then decode it.

    Pixels are rounded to 8 bits first. Pillow's defaults apply otherwise (4:2:0 chroma
    subsampling, standard tables), as in make_cifar_c.py, which calls `save(..., quality=q)`.
    """
    _check_severity("jpeg_compression", severity, CIFAR10C_SEVERITIES)
    quality = CIFAR10C_JPEG_QUALITY[severity - 1]
    pixels = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)

    decoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as jpeg:
            decoded.append(np.asarray(jpeg.convert("RGB")))

    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=x.device, dtype=x.dtype) / 255


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Convert (B, 3, H, W) RGB in [0, 1] to HSV, all in [0, 1] (hue as a fraction of a turn).

    The conventions are those of Python's colorsys and skimage.color.rgb2hsv: grey pixels get hue 0,
    and black pixels get saturation 0.
    """
    r, g, b = rgb.unbind(dim=1)
    value = rgb.amax(dim=1)
    delta = value - rgb.amin(dim=1)
    safe_value = torch.where(value > 0, value, torch.ones_like(value))
    saturation = torch.where(value > 0, delta / safe_value, torch.zeros_like(value))

    # Hue in sixths of a turn, measured from the channel that contains the maximum.
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        r == value,
        (g - b) / safe_delta,
        torch.where(g == value, 2 + (b - r) / safe_delta, 4 + (r - g) / safe_delta),
    )
    hue = torch.where(delta > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Convert (B, 3, H, W) HSV in [0, 1] back to RGB, the inverse of `rgb_to_hsv`."""
    hue, saturation, value = hsv.unbind(dim=1)
    sector = torch.floor(hue * 6)
    fraction = hue * 6 - sector
    sector = sector.long().remainder(6).unsqueeze(1)
    p = value * (1 - saturation)
    q = value * (1 - fraction * saturation)
    t = value * (1 - (1 - fraction) * saturation)

    # Each of the six hue sectors orders (value, t, p, q) differently per channel.
    red = torch.stack([value, q, p, p, t, value], dim=1).gather(1, sector)
    green = torch.stack([t, value, value, q, p, p], dim=1).gather(1, sector)
    blue = torch.stack([p, p, t, value, value, q], dim=1).gather(1, sector)
    return torch.cat([red, green, blue], dim=1)


def cifar10c_brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add the CIFAR-10-C shift to the HSV value channel, clip it to [0, 1], and convert back."""
    _check_severity("brightness", severity, CIFAR10C_SEVERITIES)
    hsv = rgb_to_hsv(x)
    value = (hsv[:, 2:] + CIFAR10C_BRIGHTNESS[severity - 1]).clamp(0, 1)
    return hsv_to_rgb(torch.cat([hsv[:, :2], value], dim=1)).clamp(0, 1)


def cifar10c_contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Scale each channel around its own mean by the CIFAR-10-C factor and clip to [0, 1]."""
    _check_severity("contrast", severity, CIFAR10C_SEVERITIES)
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * CIFAR10C_CONTRAST[severity - 1] + means).clamp(0, 1)


# ---------------------------------------------------------------- families


@dataclass(frozen=True)
class CorruptionFamily:
    """Named corruption operators and the severities at which they are defined.

    `stand_ins` names what an operator computes where that differs from its name, as for proxies.
    """

    operators: dict[str, Corruption]
    severities: tuple[int, ...]
    stand_ins: dict[str, str] = field(default_factory=dict)


FAMILIES = {
    "proxy": CorruptionFamily(
        operators={
            "gaussian_noise": proxy_gaussian_noise,
            "defocus_blur": proxy_defocus_blur,
            "fog": proxy_fog,
            "jpeg_compression": proxy_jpeg_compression,
        },
        severities=(PROXY_SEVERITY,),
        stand_ins={
            "defocus_blur": f"Gaussian blur {PROXY_BLUR_SIGMA:g} px",
            "fog": f"brightness +{PROXY_FOG_SHIFT:g}",
            "jpeg_compression": f"contrast x{PROXY_CONTRAST:g}",
        },
    ),
    "cifar10c": CorruptionFamily(
        operators={
            "gaussian_noise": cifar10c_gaussian_noise,
            "gaussian_blur": cifar10c_gaussian_blur,
            "defocus_blur": cifar10c_defocus_blur,
            "fog": cifar10c_fog,
            "jpeg_compression": cifar10c_jpeg_compression,
            "brightness": cifar10c_brightness,
            "contrast": cifar10c_contrast,
        },
        severities=CIFAR10C_SEVERITIES,
    ),
}


def _validate_images(x: torch.Tensor, low: float, high: float) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images have shape {tuple(x.shape)}, expected (B, 3, H, W)")
    if not x.is_floating_point():
        raise ValueError(f"images have dtype {x.dtype}: convert them to float in [{low}, {high}]")
    if x.numel() and (x.min() < low or x.max() > high):
        raise ValueError(
            f"images span [{x.min().item():.3f}, {x.max().item():.3f}], outside [{low}, {high}]. "
            "Use corrupt_model_range for [-1, 1] model-space images"
        )


def apply_corruption(
    x: torch.Tensor,
    name: str,
    severity: int,
    generator: torch.Generator,
    family: str = "cifar10c",
) -> torch.Tensor:
    """Apply corruption `name` of `family` at `severity` to images (B, 3, H, W) in [0, 1]."""
    if family not in FAMILIES:
        raise ValueError(f"corruption family {family!r} is unknown: use one of {list(FAMILIES)}")
    operators = FAMILIES[family].operators
    if name not in operators:
        raise ValueError(
            f"corruption {name!r} is not in the {family} family: use one of {list(operators)}"
        )
    _validate_images(x, 0.0, 1.0)
    return operators[name](x, severity, generator)


# ---------------------------------------------------------------- training protocol (Appendix D.3)


def corrupt_randomly(
    x: torch.Tensor,
    generator: torch.Generator,
    family: str = "proxy",
    severity: int = PROTOCOL_SEVERITY,
    clean_probability: float = CLEAN_PROBABILITY,
) -> tuple[torch.Tensor, list[str]]:
    """Corrupt each image independently by the study's protocol; return images and choices.

    Each image stays clean with probability `clean_probability`. Otherwise it gets one of
    PROTOCOL_CORRUPTIONS, chosen uniformly, at `severity`. The second return value names the
    choice for every image, with CLEAN for an unchanged image. Both draws are made for every
    image, so the random stream does not depend on earlier outcomes.
    """
    if not 0 <= clean_probability <= 1:
        raise ValueError(f"clean_probability {clean_probability!r} is outside [0, 1]")
    _validate_images(x, 0.0, 1.0)
    batch = x.shape[0]
    u = torch.rand(batch, generator=generator, device=generator.device)
    choice = torch.randint(
        len(PROTOCOL_CORRUPTIONS), (batch,), generator=generator, device=generator.device
    )

    # Apply each corruption to the sub-batch that drew it.
    corrupted = x.clone()
    for index, name in enumerate(PROTOCOL_CORRUPTIONS):
        selected = ((u >= clean_probability) & (choice == index)).nonzero().squeeze(1)
        if selected.numel() == 0:
            continue
        selected = selected.to(x.device)
        corrupted[selected] = apply_corruption(x[selected], name, severity, generator, family)

    names = [
        CLEAN if u_i < clean_probability else PROTOCOL_CORRUPTIONS[c_i]
        for u_i, c_i in zip(u.tolist(), choice.tolist(), strict=True)
    ]
    return corrupted, names


def corrupt_model_range(
    x: torch.Tensor,
    generator: torch.Generator,
    family: str = "proxy",
    severity: int = PROTOCOL_SEVERITY,
    clean_probability: float = CLEAN_PROBABILITY,
) -> tuple[torch.Tensor, list[str]]:
    """Run `corrupt_randomly` on model-space images in [-1, 1] and return them in [-1, 1].

    The study's eq. 16 maps x to (x + 1) / 2 before corruption and eq. 17 maps x' back to 2x' - 1.
    """
    _validate_images(x, -1.0, 1.0)
    corrupted, names = corrupt_randomly((x + 1) / 2, generator, family, severity, clean_probability)
    return 2 * corrupted - 1, names


# ---------------------------------------------------------------- corruption grid


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    tile = Image.fromarray(pixels.cpu().numpy())
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def save_corruption_grid(
    images: torch.Tensor,
    path: str | Path,
    generator: torch.Generator,
    family: str = "cifar10c",
    severities: tuple[int, ...] | None = None,
) -> Path:
    """Write a PNG grid: one row per (corruption, severity) after a clean row, one column per image.

    `images` are (N, 3, H, W) in [0, 1]. Small images are enlarged by an integer factor with
    nearest-neighbour sampling so that every tile is at least 96 pixels high. Each row is labelled
    on the left. The file is written to a temporary name and renamed.
    """
    if family not in FAMILIES:
        raise ValueError(f"corruption family {family!r} is unknown: use one of {list(FAMILIES)}")
    severities = FAMILIES[family].severities if severities is None else tuple(severities)
    _validate_images(images, 0.0, 1.0)

    # One batch per row: the clean images, then every corruption at every severity.
    rows = [("clean", images)]
    stand_ins = FAMILIES[family].stand_ins
    for name in FAMILIES[family].operators:
        for severity in severities:
            corrupted = apply_corruption(images, name, severity, generator, family)
            label = f"{name} s{severity}"
            if name in stand_ins:
                label += f"\n= {stand_ins[name]}"
            rows.append((label, corrupted))

    # Tile the rows under a label column.
    count, _, height, width = images.shape
    scale = max(1, math.ceil(96 / height))
    tile_h, tile_w = height * scale, width * scale
    label_w, gap = 130, 2
    canvas = Image.new(
        "RGB",
        (label_w + count * (tile_w + gap), len(rows) * (tile_h + gap)),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, (label, batch) in enumerate(rows):
        top = row * (tile_h + gap)
        draw.multiline_text((4, top + tile_h // 2 - 12), label, fill=(0, 0, 0), font=font)
        for column in range(count):
            canvas.paste(_to_pil(batch[column], scale), (label_w + column * (tile_w + gap), top))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- command line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    grid = commands.add_parser(
        "grid",
        help="write a PNG of every corruption at every severity on held-out images",
        formatter_class=HelpFormatter,
    )
    grid.add_argument(
        "--data",
        default=os.environ.get("DDPM_DATA"),
        help="data folder with the dataset (default: $DDPM_DATA)",
    )
    grid.add_argument("--out", required=True, help="path of the PNG to write")
    grid.add_argument("--dataset", choices=DATASETS, default="cifar10", help="images to corrupt")
    grid.add_argument(
        "--corruptions",
        choices=list(FAMILIES),
        default="cifar10c",
        help="corruption family: the study's proxies (severity 3) or CIFAR-10-C (severities 1-5)",
    )
    grid.add_argument("--num-images", type=int, default=6, help="number of test images (columns)")
    grid.add_argument("--seed", type=int, default=0, help="seed of the corruption generator")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.data is None:
        raise SystemExit("error: missing data folder: pass --data DIR or set DDPM_DATA")
    if args.num_images < 1:
        raise SystemExit(f"error: --num-images {args.num_images} must be at least 1")

    images, _ = load_dataset(args.dataset, args.data, split="test")
    images = images[: args.num_images].float() / 255
    generator = torch.Generator().manual_seed(args.seed)
    path = save_corruption_grid(images, args.out, generator, family=args.corruptions)
    print(f"wrote {path}: {len(images)} {args.dataset} test images, {args.corruptions} family")


if __name__ == "__main__":
    main()
