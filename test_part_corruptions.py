"""Tests for corruptions.py: proxy formulas, the training protocol and the CIFAR-10-C tables."""

import colorsys
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

import corruptions
from data import load_dataset


def data_dir() -> Path:
    """Return $DDPM_DATA. Skip when it is unset, and fail when it names no folder."""
    root = os.environ.get("DDPM_DATA")
    if not root:
        pytest.skip("DDPM_DATA is not set; set it to the data folder to run real-image tests")
    assert Path(root).is_dir(), f"DDPM_DATA={root} is not a folder"
    return Path(root)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textured_images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Return smooth gradients plus noise in [0, 1], with a different mean in each channel."""
    coords = torch.linspace(0, 1, size)
    gradient = coords[None, :] * coords[:, None]
    noise = torch.rand(batch, 3, size, size, generator=generator(seed))
    channel_offset = torch.tensor([0.1, 0.4, 0.7]).view(1, 3, 1, 1)
    return (0.3 * gradient + 0.3 * noise + channel_offset).clamp(0, 1)


def extreme_images(size: int = 32) -> torch.Tensor:
    """Return black, white, random and half-black/half-white images in [0, 1]."""
    black = torch.zeros(1, 3, size, size)
    white = torch.ones(1, 3, size, size)
    random = torch.rand(1, 3, size, size, generator=generator(7))
    split = torch.zeros(1, 3, size, size)
    split[..., size // 2 :] = 1
    return torch.cat([black, white, random, split])


# ---------------------------------------------------------------- proxy operators


def test_proxy_noise_matches_eq_12():
    x = textured_images()
    out = corruptions.apply_corruption(x, "gaussian_noise", 3, generator(1), "proxy")
    eps = torch.randn(x.shape, generator=generator(1))
    expected = (x + 0.18 * eps).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_proxy_blur_matches_eq_13():
    x = textured_images(batch=2, size=24)
    out = corruptions.apply_corruption(x, "defocus_blur", 3, generator(), "proxy")

    # Direct 2D sum of eq. 13 over offsets up to ceil(3 * 3) = 9, normalized, with reflect borders.
    offsets = np.arange(-9, 10)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 3.0**2))
    kernel /= kernel.sum()
    image = x[1, 2].double().numpy()
    padded = np.pad(image, 9, mode="reflect")
    for row, col in [(0, 0), (5, 17), (23, 23), (12, 0)]:
        window = padded[row : row + 19, col : col + 19]
        assert out[1, 2, row, col].item() == pytest.approx((window * kernel).sum(), abs=1e-6)


def test_proxy_blur_matches_scipy_mirror():
    x = textured_images(batch=2, size=24)
    out = corruptions.apply_corruption(x, "defocus_blur", 3, generator(), "proxy")
    expected = scipy.ndimage.gaussian_filter(
        x.double().numpy(), sigma=(0, 0, 3.0, 3.0), mode="mirror", truncate=3.0
    )
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_proxy_blur_kernel_radius_is_nine():
    x = torch.zeros(1, 3, 41, 41)
    x[:, :, 20, 20] = 1
    out = corruptions.apply_corruption(x, "defocus_blur", 3, generator(), "proxy")
    row = out[0, 0, 20]
    assert row[20 - 9].item() > 0
    assert row[20 + 9].item() > 0
    assert row[20 - 10].item() == 0
    assert row[20 + 10].item() == 0
    assert out.sum().item() == pytest.approx(3.0, abs=1e-5)


def test_proxy_blur_rejects_tiny_images():
    with pytest.raises(ValueError, match="too small"):
        corruptions.apply_corruption(
            torch.rand(1, 3, 8, 8), "defocus_blur", 3, generator(), "proxy"
        )


def test_proxy_fog_matches_eq_14():
    x = textured_images()
    out = corruptions.apply_corruption(x, "fog", 3, generator(), "proxy")
    torch.testing.assert_close(out, (x + 0.3).clamp(0, 1), rtol=0, atol=0)


def test_proxy_jpeg_matches_eq_15():
    x = textured_images()
    out = corruptions.apply_corruption(x, "jpeg_compression", 3, generator(), "proxy")

    # One mean per image over every pixel and channel.
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, (0.2 * (x - mu) + mu).clamp(0, 1), rtol=0, atol=1e-7)

    # The channels have different means here, so a per-channel mean would give other values.
    channel_mu = x.mean(dim=(2, 3), keepdim=True)
    per_channel = (0.2 * (x - channel_mu) + channel_mu).clamp(0, 1)
    assert (out - per_channel).abs().max().item() > 0.05


@pytest.mark.parametrize("name", ["gaussian_noise", "defocus_blur", "fog", "jpeg_compression"])
def test_proxy_outputs_stay_in_unit_range(name):
    out = corruptions.apply_corruption(extreme_images(), name, 3, generator(), "proxy")
    assert out.min().item() >= 0
    assert out.max().item() <= 1
    assert out.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("severity", [1, 2, 4, 5])
def test_proxy_rejects_other_severities(severity):
    with pytest.raises(ValueError, match=f"severity {severity} is invalid"):
        corruptions.apply_corruption(textured_images(), "fog", severity, generator(), "proxy")


# ---------------------------------------------------------------- training protocol


def test_protocol_frequencies_match_paper():
    draws = 10_000
    x = torch.rand(draws, 3, 12, 12, generator=generator(3))
    _, names = corruptions.corrupt_randomly(x, generator(4), family="proxy")
    assert len(names) == draws

    # Clean with probability 0.2, and each of the four corruptions with 0.8 / 4 = 0.2.
    tolerance = 4 * math.sqrt(draws * 0.2 * 0.8)
    for name in (corruptions.CLEAN, *corruptions.PROTOCOL_CORRUPTIONS):
        count = names.count(name)
        assert abs(count - 0.2 * draws) < tolerance, f"{name}: {count} of {draws}"


def test_protocol_choices_match_outputs():
    x = textured_images(batch=64, size=16)
    out, names = corruptions.corrupt_randomly(x, generator(5), family="proxy")
    assert set(names) == {corruptions.CLEAN, *corruptions.PROTOCOL_CORRUPTIONS}

    # Every deterministic proxy reproduces its image exactly, and noise leaves a random residual.
    for i, name in enumerate(names):
        image = x[i : i + 1]
        if name == corruptions.CLEAN:
            expected = image
        elif name == "gaussian_noise":
            assert (out[i] - x[i]).abs().max().item() > 0.1, f"image {i} has no noise"
            continue
        else:
            expected = corruptions.apply_corruption(image, name, 3, generator(), "proxy")
        torch.testing.assert_close(out[i : i + 1], expected, rtol=0, atol=1e-6)


def test_protocol_same_seed_reproduces():
    x = textured_images(batch=16)
    first, first_names = corruptions.corrupt_randomly(x, generator(11))
    second, second_names = corruptions.corrupt_randomly(x, generator(11))
    assert first_names == second_names
    assert torch.equal(first, second)


def test_protocol_other_seed_differs():
    x = textured_images(batch=16)
    first, first_names = corruptions.corrupt_randomly(x, generator(11))
    second, second_names = corruptions.corrupt_randomly(x, generator(12))
    assert first_names != second_names
    assert not torch.equal(first, second)


def test_model_range_wrapper_maps_eq_16_17():
    x_unit = textured_images(batch=32, size=16)
    x_model = 2 * x_unit - 1
    out, names = corruptions.corrupt_model_range(x_model, generator(6))
    reference, reference_names = corruptions.corrupt_randomly(x_unit, generator(6))
    assert names == reference_names
    torch.testing.assert_close(out, 2 * reference - 1, rtol=0, atol=1e-6)
    assert out.min().item() >= -1
    assert out.max().item() <= 1

    fog = names.index("fog")
    expected_fog = 2 * ((x_model[fog] + 1) / 2 + 0.3).clamp(0, 1) - 1
    torch.testing.assert_close(out[fog], expected_fog, rtol=0, atol=1e-6)


def test_model_range_wrapper_rejects_unit_overflow():
    with pytest.raises(ValueError, match="outside"):
        corruptions.corrupt_model_range(torch.full((1, 3, 16, 16), 1.5), generator())


def test_protocol_runs_cifar10c_family():
    x = textured_images(batch=32)
    out, names = corruptions.corrupt_randomly(x, generator(8), family="cifar10c")
    fog = names.index("fog")
    assert not torch.equal(out[fog], (x[fog] + 0.3).clamp(0, 1))
    assert out.min().item() >= 0
    assert out.max().item() <= 1


# ---------------------------------------------------------------- CIFAR-10-C operators


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_cifar10c_noise_std_per_severity(severity):
    grey = torch.full((8, 3, 64, 64), 0.5)
    out = corruptions.apply_corruption(grey, "gaussian_noise", severity, generator(severity))
    measured = (out - grey).std().item()
    expected = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    assert measured == pytest.approx(expected, rel=0.02)


def pillow_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def test_cifar10c_jpeg_uses_quality_58():
    x = textured_images()
    out = corruptions.apply_corruption(x, "jpeg_compression", 3, generator())
    assert torch.equal(out, pillow_round_trip(x, 58))
    assert not torch.equal(out, pillow_round_trip(x, 65))
    assert not torch.equal(out, pillow_round_trip(x, 50))


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_cifar10c_blur_sigma_per_severity(severity):
    impulse = torch.zeros(1, 3, 21, 21)
    impulse[:, :, 10, 10] = 1
    out = corruptions.apply_corruption(impulse, "gaussian_blur", severity, generator())

    # For a sampled Gaussian, response(1) / response(0) = exp(-1 / (2 sigma^2)).
    ratio = (out[0, 0, 10, 11] / out[0, 0, 10, 10]).item()
    measured_sigma = math.sqrt(-1 / (2 * math.log(ratio)))
    expected = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    assert measured_sigma == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_cifar10c_blur_matches_scipy_nearest(severity):
    # skimage.filters.gaussian, which make_cifar_c.py calls, is gaussian_filter with these options.
    x = textured_images(batch=2)
    out = corruptions.apply_corruption(x, "gaussian_blur", severity, generator())
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    expected = scipy.ndimage.gaussian_filter(
        x.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0
    )
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_defocus_kernel_severity_1_is_alias_gaussian():
    # Radius 0.3 keeps only the centre pixel, so the kernel is the 3x3 alias Gaussian (sigma 0.4).
    kernel = corruptions.defocus_kernel(0.3, 0.4)
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    taps /= taps.sum()
    np.testing.assert_allclose(kernel.numpy(), np.outer(taps, taps), atol=1e-12)


@pytest.mark.parametrize("radius,alias_sigma", corruptions.CIFAR10C_DEFOCUS)
def test_defocus_kernel_sums_to_one(radius, alias_sigma):
    kernel = corruptions.defocus_kernel(radius, alias_sigma)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert kernel.shape[0] == kernel.shape[1]
    assert kernel.shape[0] == 2 * math.floor(radius) + 3


def test_defocus_blur_flat_image_unchanged():
    flat = torch.full((2, 3, 32, 32), 0.37)
    out = corruptions.apply_corruption(flat, "defocus_blur", 5, generator())
    torch.testing.assert_close(out, flat, rtol=0, atol=1e-6)


def test_fog_works_at_256():
    x = textured_images(batch=2, size=256)
    out = corruptions.apply_corruption(x, "fog", 3, generator(2))
    assert out.shape == (2, 3, 256, 256)
    assert out.min().item() >= 0
    assert out.max().item() <= 1
    assert (out - x).abs().mean().item() > 0.01

    # Without the clip, out = (x + 0.75 * haze) * m / (m + 0.75), with m the image maximum.
    # The haze varies across the image, unlike a global brightness shift.
    scale = x.amax(dim=(1, 2, 3), keepdim=True) / (x.amax(dim=(1, 2, 3), keepdim=True) + 0.75)
    haze = (out - x * scale) / (0.75 * scale)
    assert haze.std(dim=(2, 3)).min().item() > 0.05


def test_fog_same_seed_reproduces():
    x = textured_images(batch=2)
    first = corruptions.apply_corruption(x, "fog", 4, generator(9))
    second = corruptions.apply_corruption(x, "fog", 4, generator(9))
    third = corruptions.apply_corruption(x, "fog", 4, generator(10))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_plasma_fractal_spans_unit_range():
    height_map = corruptions.plasma_fractal(3, 64, 2.5, generator())
    assert height_map.shape == (3, 64, 64)
    assert height_map.amin(dim=(1, 2)).tolist() == [0.0, 0.0, 0.0]
    assert height_map.amax(dim=(1, 2)).tolist() == [1.0, 1.0, 1.0]


def test_plasma_fractal_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        corruptions.plasma_fractal(1, 48, 2.5, generator())


def test_fog_non_square_image():
    out = corruptions.apply_corruption(torch.rand(1, 3, 20, 40), "fog", 1, generator())
    assert out.shape == (1, 3, 20, 40)


def test_hsv_matches_colorsys():
    x = torch.rand(1, 3, 8, 8, generator=generator(13))
    x[0, :, 0, 0] = 0.5  # grey
    x[0, :, 0, 1] = 0.0  # black
    x[0, :, 0, 2] = torch.tensor([0.9, 0.9, 0.1])  # red and green tie for the maximum
    hsv = corruptions.rgb_to_hsv(x)
    for row in range(8):
        for col in range(8):
            expected = colorsys.rgb_to_hsv(*x[0, :, row, col].tolist())
            np.testing.assert_allclose(hsv[0, :, row, col].numpy(), expected, atol=1e-6)


def test_hsv_round_trip():
    x = torch.rand(2, 3, 16, 16, generator=generator(14))
    back = corruptions.hsv_to_rgb(corruptions.rgb_to_hsv(x))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)


def test_brightness_shifts_hsv_value():
    x = torch.tensor([0.6, 0.3, 0.2]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    x[0, :, 0, 0] = 0.0  # black becomes grey at the shift
    x[0, :, 0, 1] = torch.tensor([0.95, 0.5, 0.1])  # the value clips at 1
    out = corruptions.apply_corruption(x, "brightness", 3, generator())

    expected = colorsys.hsv_to_rgb(*colorsys.rgb_to_hsv(0.6, 0.3, 0.2)[:2], 0.6 + 0.15)
    np.testing.assert_allclose(out[0, :, 2, 2].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [0.15, 0.15, 0.15], atol=1e-6)
    assert out[0, :, 0, 1].max().item() == pytest.approx(1.0)


def test_contrast_uses_channel_means():
    x = textured_images()
    out = corruptions.apply_corruption(x, "contrast", 3, generator())
    means = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out, ((x - means) * 0.4 + means).clamp(0, 1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(corruptions.FAMILIES["cifar10c"].operators))
def test_cifar10c_outputs_stay_in_unit_range(name):
    for severity in corruptions.CIFAR10C_SEVERITIES:
        out = corruptions.apply_corruption(extreme_images(), name, severity, generator())
        assert out.min().item() >= 0, f"severity {severity}"
        assert out.max().item() <= 1, f"severity {severity}"


@pytest.mark.parametrize("name", list(corruptions.FAMILIES["cifar10c"].operators))
def test_cifar10c_same_seed_reproduces(name):
    x = textured_images(batch=2)
    first = corruptions.apply_corruption(x, name, 3, generator(21))
    second = corruptions.apply_corruption(x, name, 3, generator(21))
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["gaussian_noise", "fog"])
def test_cifar10c_other_seed_differs(name):
    x = textured_images(batch=2)
    first = corruptions.apply_corruption(x, name, 3, generator(21))
    second = corruptions.apply_corruption(x, name, 3, generator(22))
    assert not torch.equal(first, second)


def test_global_rng_is_untouched():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    corruptions.corrupt_randomly(textured_images(batch=16), generator(1), family="cifar10c")
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- input checks


def test_apply_rejects_unknown_names():
    x = textured_images()
    with pytest.raises(ValueError, match="'snow' is not in the cifar10c family"):
        corruptions.apply_corruption(x, "snow", 3, generator())
    with pytest.raises(ValueError, match="family 'imagenet' is unknown"):
        corruptions.apply_corruption(x, "fog", 3, generator(), "imagenet")
    with pytest.raises(ValueError, match="severity 6 is invalid"):
        corruptions.apply_corruption(x, "fog", 6, generator())


def test_apply_rejects_model_range_images():
    with pytest.raises(ValueError, match="corrupt_model_range"):
        corruptions.apply_corruption(2 * textured_images() - 1, "fog", 3, generator())


# ---------------------------------------------------------------- grid


def test_grid_has_row_per_severity(tmp_path):
    images = textured_images(batch=3)
    path = corruptions.save_corruption_grid(images, tmp_path / "grid.png", generator())
    with Image.open(path) as grid:
        width, height = grid.size
    rows = 1 + 7 * 5  # clean, then 7 corruptions x 5 severities
    assert height == rows * (96 + 2)
    assert width == 130 + 3 * (96 + 2)


def test_grid_proxy_family_one_severity(tmp_path):
    images = textured_images(batch=2, size=256)
    path = corruptions.save_corruption_grid(
        images, tmp_path / "proxy.png", generator(), family="proxy"
    )
    with Image.open(path) as grid:
        assert grid.size == (130 + 2 * 258, 5 * 258)


@pytest.mark.slow
def test_grid_cli_on_real_images(tmp_path):
    out = tmp_path / "grid.png"
    command = [sys.executable, "corruptions.py", "grid", "--data", str(data_dir())]
    command += ["--out", str(out), "--num-images", "4", "--seed", "3"]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as grid:
        assert grid.size == (130 + 4 * 98, 36 * 98)


def test_cifar10c_jpeg_real_images():
    images, _ = load_dataset("cifar10", data_dir(), split="test")
    x = images[:8].float() / 255
    out = corruptions.apply_corruption(x, "jpeg_compression", 3, generator())
    assert torch.equal(out, pillow_round_trip(x, 58))
    assert not torch.equal(out, pillow_round_trip(x, 65))
