"""Measure DDPM samples by FID and Inception Score, and models by the variational-bound NLL.

FID (Heusel et al. 2017, arXiv 1706.08500) and the Inception Score (Salimans et al. 2016,
arXiv 1606.03498) use the FID variant of Inception v3 (Szegedy et al. 2016, arXiv 1512.00567):
the 2015-12-05 TensorFlow graph whose weights pytorch-fid ported to PyTorch. The network is
written here with torch.nn only and loads those weights by name. The NLL is the DDPM
variational bound of Ho et al. 2020 (arXiv 2006.11239) in bits/dim, from diffusion.py.

    python metrics.py eval --checkpoint MODEL.safetensors --dataset cifar10 --out-dir runs/eval

The defaults follow Ho et al. 2020, Table 1: 50,000 samples from 1000 ancestral steps, FID
against the 50,000 CIFAR-10 training images, where the paper reports FID 3.17 and IS 9.46 ± 0.11.
Other commands: `fid A B`, `is A`, `stats`, `nll` and `sample`; see `--help` of each.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.special
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from checkpoint import atomic_write, load_model, write_json
from data import cache_dir, load_dataset, read_rgb_image, to_model_range
from diffusion import SAMPLERS, Diffusion
from logs import HelpFormatter, Progress, log_event, save_config, warn

# ---------------------------------------------------------------------------- constants

# pytorch-fid's port of the TensorFlow Inception graph, 95,628,359 bytes. Its name ends with the
# first 8 hex digits of its sha256, as torch.hub names files. torch-fidelity publishes the same
# file as weights-inception-2015-12-05-6726825d.pth.
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAMES = (
    "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth",
)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_FORMAT = "ddpm-stability/inception-1"
INCEPTION_SIZE = 299  # input height and width of Inception v3
INCEPTION_RESIZE = "bilinear to 299x299, align_corners=False, then 2x - 1"
FEATURE_DIMS = 2048  # pool3 features
INCEPTION_CLASSES = 1008  # output classes of the TensorFlow graph
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download fails

IS_SPLITS = 10

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SAMPLE_FORMAT = "ddpm-stability/samples-1"
SAMPLE_MANIFEST = "samples.json"

# Per-dataset evaluation defaults. CIFAR-10 uses the standard 50,000 samples against the 50,000
# training images. Ho et al. 2020 give no CelebA-HQ FID, and 50,000 samples at 256x256 cost
# about 70 GPU-hours by the estimate below, so the default is 10,000 against all training images.
# FID is biased upward at small sample counts, so compare only numbers from equal counts.
#
# Cost estimate for CelebA-HQ, not a measurement: google/ddpm-celebahq-256 needs 496 GFLOP per
# image per forward (torch.utils.flop_counter on the diffusers UNet2DModel), so 1000 steps cost
# 0.50 PFLOP per image. At an assumed effective 100 TFLOP/s that is 5.0 s per image, about 730
# images per GPU-hour, so 10,000 samples take about 14 GPU-hours. The CIFAR-10 UNet needs 12.1
# GFLOP per forward, about 40 times less per image.
DATASET_DEFAULTS = {
    "cifar10": {
        "image_size": 32,
        "fid_samples": 50_000,
        "steps": 1000,
        "sampler": "ancestral",
        "sample_batch_size": 256,
        "reference_split": "train",
        "nll_split": "test",
    },
    "celebahq": {
        "image_size": 256,
        "fid_samples": 10_000,
        "steps": 1000,
        "sampler": "ancestral",
        "sample_batch_size": 16,
        "reference_split": "all",
        "nll_split": "test",
    },
}


# ---------------------------------------------------------------------------- Inception v3


class ConvBN(nn.Module):
    """Convolution without bias, batch norm and ReLU: the unit that every block is built from."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)  # the TensorFlow graph's epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def average_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """Average 3x3 windows at stride 1, counting only the pixels inside the image.

    Departure from torchvision, which divides by 9 at the border too (count_include_pad=True).
    TensorFlow's average pooling with SAME padding leaves the padding out, and the FID weights
    come from that graph.
    """
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches, concatenated."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(average_pool_3x3(x))  # FID departure, see the helper
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction from 35x35 to 17x17: strided 3x3, strided double 3x3 and max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """17x17 block with 7x7 convolutions factorized into 1x7 and 7x1."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(average_pool_3x3(x))  # FID departure, see the helper
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction from 17x17 to 8x8: strided 3x3, 7x7 then strided 3x3, and max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 convolutions.

    `pool` selects the pooling of the last branch. torchvision averages in both E blocks, but the
    TensorFlow graph behind the FID weights max-pools in the second one (Mixed_7c), so the FID
    network uses "avg" for Mixed_7b and "max" for Mixed_7c.
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool={pool!r} is not 'avg' or 'max'")
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1
        )
        if self.pool == "avg":
            pooled = average_pool_3x3(x)  # FID departure, see the helper
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)  # FID departure
        branch_pool = self.branch_pool(pooled)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception v3 as in the TensorFlow graph that defines FID, without the auxiliary classifier.

    Departures from torchvision's Inception3: average pooling that excludes padding in the A, C
    and first E blocks, max pooling in the second E block, and 1008 output classes because the
    TensorFlow graph has 1008. Module names equal those of pytorch-fid's weight file.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIMS, INCEPTION_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute pool3 features (B, 2048) and bias-free logits (B, 1008).

        `images` are float (B, 3, H, W) in [0, 1] of any size.
        """
        x = F.interpolate(
            images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
        )
        x = 2 * x - 1  # the TensorFlow graph expects [-1, 1]
        # channels_last (NHWC) from here on, the layout of GPU tensor-core convolutions.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_1a_3x3(x)  # B x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # B x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # B x 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # B x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)  # B x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # B x 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # B x 192 x 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # B x 288 x 35 x 35
        x = self.Mixed_6a(x)  # B x 768 x 17 x 17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # B x 768 x 17 x 17
        x = self.Mixed_7a(x)  # B x 1280 x 8 x 8
        x = self.Mixed_7c(self.Mixed_7b(x))  # B x 2048 x 8 x 8
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # B x 2048

        # The Inception Score code of Salimans et al. multiplies pool3 by the softmax weights and
        # adds no bias, so fc.bias is loaded with the weights but not used.
        logits = features @ self.fc.weight.T  # B x 1008
        return features, logits


# ---------------------------------------------------------------------------- Inception weights


class InceptionWeightsNotFound(FileNotFoundError):
    """The FID Inception weights are neither local nor downloadable."""


def file_sha256(path: Path) -> str:
    """Hash a file in 1 MiB chunks and return the hex sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inception_cache_dir(cache: Path | None = None) -> Path:
    """Return the folder for downloaded and converted Inception weights."""
    return (cache or cache_dir()) / "inception"


def converted_path(sha256: str, cache: Path | None = None) -> Path:
    """Return the cache path of the safetensors converted from a .pth with this sha256."""
    return inception_cache_dir(cache) / f"fid-inception-{sha256[:16]}.safetensors"


def check_inception_state(state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise ValueError unless `state` has exactly the FID Inception's tensor names and shapes.

    BatchNorm's `num_batches_tracked` counters are ignored because eval mode never reads them.
    """
    with torch.device("meta"):  # shapes only, no memory or initialization
        reference = FIDInceptionV3()
    expected = {
        name: tuple(tensor.shape)
        for name, tensor in reference.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }
    actual = {
        name: tuple(tensor.shape)
        for name, tensor in state.items()
        if not name.endswith("num_batches_tracked")
    }
    missing = sorted(expected.keys() - actual.keys())
    unexpected = sorted(actual.keys() - expected.keys())
    misshapen = [
        f"{name} {actual[name]} (expected {expected[name]})"
        for name in sorted(expected.keys() & actual.keys())
        if actual[name] != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, first {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, first {unexpected[:3]}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensors of the wrong shape, first {misshapen[:3]}")
    if problems:
        raise ValueError(
            f"{source} does not contain the FID Inception v3 weights: {'; '.join(problems)}. "
            f"Pass pytorch-fid's {INCEPTION_FILENAMES[0]} (from {INCEPTION_URL}) or a "
            f"safetensors file converted from it"
        )


def read_pth_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a .pth state dict without unpickling arbitrary objects and check its names."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path} cannot be read as a PyTorch state dict ({error}); download "
            f"{INCEPTION_URL} again"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} contains a {type(state).__name__}, not a state dict")
    check_inception_state(state, path)
    return state


def convert_inception_weights(pth: Path, destination: Path, sha256: str) -> None:
    """Convert pytorch-fid's .pth to safetensors that records the .pth's sha256."""
    state = read_pth_weights(pth)
    tensors = {name: tensor.contiguous().float() for name, tensor in state.items()}
    tensors = {n: t for n, t in tensors.items() if not n.endswith("num_batches_tracked")}
    metadata = {"format": INCEPTION_FORMAT, "source_file": pth.name, "source_sha256": sha256}
    atomic_write(destination, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    print(f"inception: converted {pth} to {destination}")


def download_inception_weights(url: str, destination: Path, sha256: str) -> None:
    """Download `url` to `destination`, keeping the file only when its sha256 matches.

    Env var DDPM_OFFLINE=1 turns the download into a URLError, for air-gapped machines and CI.
    """
    if os.environ.get("DDPM_OFFLINE") == "1":
        raise urllib.error.URLError("downloads are off because DDPM_OFFLINE=1")

    def download(tmp: Path) -> None:
        digest = hashlib.sha256()
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response,
            open(tmp, "wb") as f,
        ):
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                f"the file is damaged or was replaced, so it was deleted. Try again, or download "
                f"it by hand and pass it with --inception PATH"
            )

    print(f"inception: downloading {url} to {destination}")
    atomic_write(destination, download)


def local_inception_candidates(cache: Path | None = None) -> list[Path]:
    """Return the paths where the official .pth may already be: our cache and torch hub's."""
    folders = [inception_cache_dir(cache), Path(torch.hub.get_dir()) / "checkpoints"]
    return [folder / name for folder in folders for name in INCEPTION_FILENAMES]


def resolve_inception_weights(
    path: str | Path | None = None, cache: Path | None = None, url: str | None = None
) -> Path:
    """Return a converted safetensors file of the FID Inception weights, making it when needed.

    With `path`, a .safetensors file is used as it is and a .pth is converted once into the
    cache. Without it, the official .pth is looked up locally, else downloaded from `url`
    (default INCEPTION_URL) and checked against its sha256. Raises InceptionWeightsNotFound when
    none is local and the download fails.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {path} not found; pass pytorch-fid's "
                f"{INCEPTION_FILENAMES[0]} or a converted .safetensors"
            )
        if path.suffix == ".safetensors":
            return path
        sha256 = file_sha256(path)
        destination = converted_path(sha256, cache)
        if not destination.is_file():
            convert_inception_weights(path, destination, sha256)
        return destination

    # The official file: converted, local, or downloaded, in that order.
    destination = converted_path(INCEPTION_SHA256, cache)
    if destination.is_file():
        return destination
    local = next((p for p in local_inception_candidates(cache) if p.is_file()), None)
    if local is not None:
        sha256 = file_sha256(local)
        if sha256 != INCEPTION_SHA256:
            raise ValueError(
                f"{local} has sha256 {sha256}, expected {INCEPTION_SHA256}; the file is "
                f"damaged. Delete it so that it is downloaded again, or pass a good copy "
                f"with --inception PATH"
            )
    else:
        local = inception_cache_dir(cache) / INCEPTION_FILENAMES[0]
        url = url or INCEPTION_URL
        try:
            download_inception_weights(url, local, INCEPTION_SHA256)
        except OSError as error:
            raise InceptionWeightsNotFound(
                f"FID Inception weights not found: {INCEPTION_FILENAMES[0]} is not in "
                f"{inception_cache_dir(cache)} or {Path(torch.hub.get_dir()) / 'checkpoints'}, "
                f"and the download from {url} failed ({error}). Download it where there is "
                f"internet access, copy it to {local}, or pass it with --inception PATH"
            ) from error
    convert_inception_weights(local, destination, INCEPTION_SHA256)
    return destination


def load_inception(
    path: str | Path | None = None, device="cpu", cache: Path | None = None
) -> tuple[FIDInceptionV3, str]:
    """Build the FID Inception in eval mode and return it with the sha256 of its source .pth.

    Weights other than the official file load with a warning, because their FID and IS are not
    comparable with published numbers.
    """
    weights_path = resolve_inception_weights(path, cache)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{weights_path} is not a readable safetensors file ({error}); delete it so that it "
            f"is converted again"
        ) from error
    check_inception_state(state, weights_path)
    sha256 = metadata.get("source_sha256") or file_sha256(weights_path)
    if sha256 != INCEPTION_SHA256:
        warn(
            f"Inception weights {weights_path} have sha256 {sha256}, not pytorch-fid's "
            f"{INCEPTION_SHA256}; FID and IS from them are not comparable with published numbers"
        )
    model = FIDInceptionV3()
    # The names and shapes were checked above, so strict=False only skips the BatchNorm counters.
    model.load_state_dict(state, strict=False)
    # The network only runs inference, so its convolution weights can take the activations'
    # channels_last layout once here.
    model = model.eval().requires_grad_(False)
    return model.to(device, memory_format=torch.channels_last), sha256


# ---------------------------------------------------------------------------- images and features


def list_image_files(folder: Path) -> list[Path]:
    """Return the image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def image_file_batches(paths: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """Decode image files into uint8 batches (B, 3, H, W); all must have the first one's size."""
    first_shape = None
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            image = read_rgb_image(path)
            first_shape = first_shape or image.shape
            if image.shape != first_shape:
                raise ValueError(
                    f"{path} is {tuple(image.shape[1:])}, but {paths[0].name} is "
                    f"{tuple(first_shape[1:])}; resize the images to one size first"
                )
            batch.append(image)
        yield torch.stack(batch)


def tensor_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split a uint8 image tensor into batches."""
    yield from images.split(batch_size)


def inference_precision(device: torch.device, amp: str = "off"):
    """Return the precision context of Inception: float32 without TF32, or autocast to `amp`.

    With amp "off", cuDNN may still run float32 convolutions in TF32, which keeps 10 mantissa
    bits instead of 23, so features and FID would depend on the GPU generation. The context
    turns TF32 off on CUDA. "bf16" and "fp16" autocast the network instead. With random weights
    on CPU, bf16 moved pool3 features by a median 4.6e-3 relative and the FID of 256 CIFAR-10
    test against 256 training images by +1.7% (bench.py measures it).
    NOTE: the CUDA paths have not been run (no GPU in testing), and the bf16 FID shift has not
    been measured with pytorch-fid's weights, which were not available offline.
    """
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp != "off" and amp not in dtypes:
        raise ValueError(f"amp={amp!r} is not one of {[*dtypes, 'off']}")
    if amp != "off":
        return torch.autocast(device.type, dtype=dtypes[amp])
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(
        enabled=True,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=False,
    )


@torch.no_grad()
def inception_outputs(
    inception: FIDInceptionV3,
    batches: Iterable[torch.Tensor],
    total: int,
    batch_size: int = 100,
    amp: str = "off",
    compile: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run uint8 image batches (B, 3, H, W) through Inception.

    Returns float32 arrays of pool3 features (N, 2048) and bias-free logits (N, 1008). The
    network runs in float32 unless `amp` is "bf16" or "fp16", and through torch.compile when
    `compile` is set, which pays only over many batches of one size.
    """
    device = next(inception.parameters()).device
    network = torch.compile(inception) if compile else inception
    features, logits = [], []
    progress = Progress(total, "inception", unit="img")
    with inference_precision(device, amp):
        for batch in batches:
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
                raise ValueError(
                    f"Inception expects uint8 images (B, 3, H, W), got {batch.dtype} "
                    f"{tuple(batch.shape)}"
                )
            for chunk in batch.split(batch_size):
                # uint8 / 255 gives [0, 1], the same values as torchvision's ToTensor.
                images = chunk.to(device).float() / 255
                chunk_features, chunk_logits = network(images)
                features.append(chunk_features.float().cpu().numpy())
                logits.append(chunk_logits.float().cpu().numpy())
                progress.update(len(chunk))
    progress.close()
    if not features:
        raise ValueError("no images to run through Inception")
    return np.concatenate(features), np.concatenate(logits)


# ---------------------------------------------------------------------------- FID and IS


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute the float64 mean `mu` (D,) and covariance `cov` (D, D) of features (N, D).

    With fewer samples than feature dimensions the covariance is singular. This warns on
    stderr, and frechet_distance still returns a finite value.
    """
    features = np.asarray(features, dtype=np.float64)
    count, dims = features.shape
    if count < 2:
        raise ValueError(f"FID statistics need at least 2 samples, got {count}")
    if count < dims:
        warn(
            f"FID statistics from {count:,} samples, fewer than the {dims:,} feature dimensions: "
            f"the covariance is singular and FID is biased upward. Use at least {dims:,} "
            f"samples, and compare only FIDs from equal sample counts"
        )
    mu = features.mean(axis=0)
    cov = np.cov(features, rowvar=False)
    return mu, cov


def check_covariance(matrix: np.ndarray, name: str) -> None:
    """Raise ValueError unless a matrix is finite and symmetric, as a covariance must be."""
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or inf")
    if np.abs(matrix - matrix.T).max() > 1e-6 * np.abs(matrix).max():
        raise ValueError(f"{name} is not symmetric, so it is not a covariance matrix")


def nonnegative_eigenvalues(eigenvalues: np.ndarray, name: str) -> np.ndarray:
    """Clip the rounding noise below zero off the eigenvalues of a PSD matrix.

    Raises ValueError for an eigenvalue below -1e-6 times the largest one, which rounding cannot
    explain.
    """
    if eigenvalues.min() < -1e-6 * np.abs(eigenvalues).max():
        raise ValueError(
            f"{name} has the negative eigenvalue {eigenvalues.min():.3g}, so the FID statistics "
            f"do not hold covariance matrices"
        )
    return np.clip(eigenvalues, 0, None)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Compute the Frechet distance between N(mu1, cov1) and N(mu2, cov2).

    Heusel et al. 2017: FID = |mu1 - mu2|^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1 cov2)^(1/2)).
    The last trace is the sum of the square roots of the eigenvalues of cov1 cov2, which equal
    those of the symmetric matrix cov1^(1/2) cov2 cov1^(1/2), so two symmetric eigensolvers give
    it. Their eigenvalues are real, and the result stays finite for singular covariances (fewer
    samples than dimensions). pytorch-fid instead takes scipy.linalg.sqrtm of the non-symmetric
    product, which can turn complex or non-finite there and needs 1e-6 added to the diagonals,
    and which is several times slower at 2048 dimensions. On full-rank statistics both agree to
    about 1e-12. On singular ones both lose digits and differ by up to about 1e-7 relative
    (4e-8 measured with 24 samples in 512 dimensions).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    dims = len(mu1)
    if mu2.shape != (dims,) or cov1.shape != (dims, dims) or cov2.shape != (dims, dims):
        raise ValueError(
            f"FID statistics do not match: mu {mu1.shape} and {mu2.shape}, "
            f"cov {cov1.shape} and {cov2.shape}"
        )
    check_covariance(cov1, "cov1")
    check_covariance(cov2, "cov2")

    # cov1^(1/2) from the eigendecomposition of cov1.
    eigenvalues, eigenvectors = np.linalg.eigh(cov1)
    eigenvalues = nonnegative_eigenvalues(eigenvalues, "cov1")
    cov1_sqrt = (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T

    # Tr((cov1 cov2)^(1/2)) from the eigenvalues of cov1^(1/2) cov2 cov1^(1/2).
    product = cov1_sqrt @ cov2 @ cov1_sqrt
    product_eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    product_eigenvalues = nonnegative_eigenvalues(product_eigenvalues, "cov1 cov2")
    trace_sqrt = np.sqrt(product_eigenvalues).sum()

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Compute the Inception Score of bias-free logits (N, 1008) as (mean, std) over splits.

    Salimans et al. 2016: IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over
    the split. Split i contains rows i*N//splits up to (i+1)*N//splits, as in their code, and std
    is the population standard deviation of the per-split scores.
    """
    logits = np.asarray(logits, dtype=np.float64)
    count = len(logits)
    if count < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images, got {count}")
    scores = []
    for i in range(splits):
        part = logits[i * count // splits : (i + 1) * count // splits]
        log_p_yx = scipy.special.log_softmax(part, axis=1)  # log p(y|x)
        log_p_y = np.log(np.exp(log_p_yx).mean(axis=0))  # log p(y)
        kl = (np.exp(log_p_yx) * (log_p_yx - log_p_y)).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------- statistics files


def save_statistics(path: str | Path, mu: np.ndarray, cov: np.ndarray, record: dict) -> None:
    """Write FID statistics as .npz, readable by pytorch-fid, atomically.

    pytorch-fid reads the covariance from the key `sigma`, so the file uses that name. `record`
    adds scalar keys such as the image count, the resize and the weights' sha256, which
    pytorch-fid ignores.
    """
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(cov, np.float64)}
    for key, value in record.items():
        if key in arrays:
            raise ValueError(f"record key {key!r} clashes with the statistics")
        arrays[key] = np.asarray(value)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read `mu`, `cov` and the record of a .npz statistics file (ours or pytorch-fid's)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(
                    f"{path} has keys {sorted(f.keys())} but FID statistics need 'mu' and "
                    f"'sigma'; compute them with `python metrics.py stats`"
                )
            mu, cov = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            record = {key: f[key].item() for key in f.keys() if key not in ("mu", "sigma")}
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz file ({error})") from error
    return mu, cov, record


def warn_if_incomparable(first: dict, second: dict) -> None:
    """Warn when two statistics records differ in Inception weights or resize."""
    for key in ("weights_sha256", "resize"):
        if key in first and key in second and first[key] != second[key]:
            warn(f"the two FID statistics differ in {key}: {first[key]} and {second[key]}")


def reference_statistics(
    dataset: str,
    data_root: str | Path,
    inception: FIDInceptionV3,
    weights_sha256: str,
    batch_size: int = 100,
    cache: Path | None = None,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return FID statistics of a dataset's training images, computed once and cached.

    Ho et al. 2020 compare with all 50,000 CIFAR-10 training images, and CelebA-HQ uses all its
    images. A local folder may contain fewer, and the record gives the count. The cache key is
    the dataset, image count, resize, a hash of the images, and the Inception weights' sha256.
    """
    split = DATASET_DEFAULTS[dataset]["reference_split"]
    native_size = DATASET_DEFAULTS[dataset]["image_size"]
    size = None if image_size in (None, native_size) else image_size
    images, _ = load_dataset(dataset, data_root, split=split, size=size)
    images_sha256 = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    resize = f"bilinear{INCEPTION_SIZE}"
    name = (
        f"{dataset}-{images.shape[-1]}px-{split}-{len(images)}-{resize}-{images_sha256[:12]}-"
        f"{weights_sha256[:12]}"
    )
    path = (cache or cache_dir()) / "fid_stats" / f"{name}.npz"
    if path.is_file():
        print(f"reference statistics: {path}")
        return load_statistics(path)

    features, _ = inception_outputs(inception, tensor_batches(images, batch_size), len(images))
    mu, cov = fid_statistics(features)
    record = {
        "dataset": dataset,
        "split": split,
        "n_images": len(images),
        "image_size": images.shape[-1],
        "images_sha256": images_sha256,
        "resize": INCEPTION_RESIZE,
        "weights_sha256": weights_sha256,
    }
    save_statistics(path, mu, cov, record)
    print(f"reference statistics: {len(images):,} {dataset} {split} images, saved to {path}")
    return mu, cov, record


# ---------------------------------------------------------------------------- sample generation


def shard_path(sample_dir: Path, index: int) -> Path:
    return sample_dir / f"shard_{index:06d}.npz"


def shard_size(n_samples: int, batch_size: int, index: int) -> int:
    """Return the number of images in shard `index`; only the last shard may be smaller."""
    return min(batch_size, n_samples - index * batch_size)


def shard_seed(seed: int, index: int) -> int:
    """Return the generator seed of one shard, derived from the run seed and the shard index.

    numpy's SeedSequence mixes both numbers, so shards of runs with nearby seeds do not share
    noise, as they would with seed + index. It yields 32 bits, all that torch's CPU generator uses.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def model_fingerprint(model: Callable) -> str | None:
    """Return the sha256 of a module's weights, or None for a plain callable."""
    if not isinstance(model, nn.Module):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def model_device(model: Callable, diffusion: Diffusion) -> torch.device:
    """Return the device of a module's first parameter, else that of the diffusion schedule."""
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device(diffusion.device)


def write_or_check_manifest(sample_dir: Path, manifest: dict) -> None:
    """Write the sampling settings of a folder, or check them against those already there."""
    path = sample_dir / SAMPLE_MANIFEST
    if not path.is_file():
        write_json(path, manifest)
        return
    existing = json.loads(path.read_text())
    for key, value in manifest.items():
        if existing.get(key) != value:
            raise ValueError(
                f"{sample_dir} contains samples made with {key}={existing.get(key)!r}, but this "
                f"run has {key}={value!r}. Resume with the same settings, or use a new folder"
            )


def to_uint8(x_0: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] images to uint8 with rounding, the inverse of data.to_model_range."""
    return ((x_0 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate_samples(
    model: Callable,
    diffusion: Diffusion,
    sample_dir: str | Path,
    *,
    n_samples: int,
    image_size: int,
    steps: int,
    sampler: str,
    seed: int,
    batch_size: int,
    eta: float = 0.0,
    worker: tuple[int, int] = (0, 1),
) -> Path:
    """Sample images into shards of `batch_size` images and return the folder.

    Shard k is one sampler call whose generator is seeded with shard_seed(seed, k), so each
    shard depends only on the settings and k: shards can run in any order and in several
    processes (`worker` (i, n) makes shards k with k % n == i). Each shard is saved atomically
    as shard_<k>.npz with uint8 `images` (B, H, W, 3), and shards already saved are skipped,
    so a killed run resumes where it stopped. samples.json records the settings, and a run with
    other settings in the same folder raises ValueError.
    """
    if n_samples < 1 or batch_size < 1 or seed < 0:
        raise ValueError(
            f"n_samples={n_samples} and batch_size={batch_size} must be positive and "
            f"seed={seed} non-negative"
        )
    index, count = worker
    if not 0 <= index < count:
        raise ValueError(f"worker {index}/{count} is invalid; use i/n with 0 <= i < n")
    sample_dir = Path(sample_dir)
    sample_dir.mkdir(parents=True, exist_ok=True)
    device = model_device(model, diffusion)
    diffusion_config = diffusion.config.to_dict() if hasattr(diffusion, "config") else None
    manifest = {
        "format": SAMPLE_FORMAT,
        "n_samples": n_samples,
        "shard_size": batch_size,
        "image_shape": [3, image_size, image_size],
        "sampler": sampler,
        "steps": steps,
        "eta": eta,
        "seed": seed,
        "shard_seed": "numpy SeedSequence([seed, shard index]), first 32-bit word",
        "generator_device": device.type,
        # NOTE: a plain callable has no fingerprint, so its folder cannot tell models apart.
        # Give each model its own folder.
        "model_sha256": model_fingerprint(model),
        "diffusion_config": diffusion_config,
    }
    write_or_check_manifest(sample_dir, manifest)

    # Shards of this worker that are not saved yet.
    n_shards = math.ceil(n_samples / batch_size)
    saved = [k for k in range(n_shards) if shard_path(sample_dir, k).is_file()]
    todo = [k for k in range(index, n_shards, count) if k not in set(saved)]
    if not todo:
        return sample_dir
    done = sum(shard_size(n_samples, batch_size, k) for k in saved)
    label = "sample" if count == 1 else f"sample (worker {index}/{count})"
    print(f"{label}: {len(todo)} shards to make in {sample_dir}, {done:,} images already there")

    # Dropout must be off while sampling; a module's mode is restored afterwards.
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    progress = Progress(sum(shard_size(n_samples, batch_size, k) for k in todo), label)
    try:
        for k in todo:
            size = shard_size(n_samples, batch_size, k)
            generator = torch.Generator(device).manual_seed(shard_seed(seed, k))
            shape = (size, 3, image_size, image_size)
            x_T = torch.randn(shape, generator=generator, device=device)
            x_0 = diffusion.sample(
                model, x_T, steps=steps, sampler=sampler, eta=eta, generator=generator
            )
            images = to_uint8(x_0).permute(0, 2, 3, 1).cpu().numpy()  # -> (B, H, W, 3)

            def write(tmp: Path, images=images) -> None:
                with open(tmp, "wb") as f:
                    np.savez(f, images=images)

            atomic_write(shard_path(sample_dir, k), write)
            progress.update(size)
    finally:
        if was_training:
            model.train()
    progress.close()
    return sample_dir


def read_manifest(sample_dir: Path) -> dict:
    path = sample_dir / SAMPLE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {sample_dir} is not a folder of sample shards")
    return json.loads(path.read_text())


def sample_shard_batches(sample_dir: Path) -> Iterator[torch.Tensor]:
    """Yield the uint8 images (B, 3, H, W) of every shard in order, after checking all exist."""
    manifest = read_manifest(sample_dir)
    n_samples, batch_size = manifest["n_samples"], manifest["shard_size"]
    n_shards = math.ceil(n_samples / batch_size)
    missing = [k for k in range(n_shards) if not shard_path(sample_dir, k).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{sample_dir} lacks {len(missing)} of {n_shards} shards (first: shard {missing[0]}); "
            f"run the sample command again with the same settings to finish them"
        )
    for k in range(n_shards):
        with np.load(shard_path(sample_dir, k), allow_pickle=False) as f:
            images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2)  # -> (B, 3, H, W)
        expected = (shard_size(n_samples, batch_size, k), *manifest["image_shape"])
        if tuple(images.shape) != expected or images.dtype != torch.uint8:
            raise ValueError(
                f"{shard_path(sample_dir, k)} contains {images.dtype} {tuple(images.shape)}, "
                f"expected uint8 {expected}; delete it and run the sample command again"
            )
        yield images


def open_images(path: Path, batch_size: int) -> tuple[Iterator[torch.Tensor], int, str]:
    """Open a folder of sample shards or of image files as (uint8 batches, count, description)."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder of images or sample shards")
    if (path / SAMPLE_MANIFEST).is_file():
        count = read_manifest(path)["n_samples"]
        return sample_shard_batches(path), count, f"{count:,} samples in {path}"
    paths = list_image_files(path)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) and no {SAMPLE_MANIFEST} in {path}"
        )
    return image_file_batches(paths, batch_size), len(paths), f"{len(paths):,} images in {path}"


# ---------------------------------------------------------------------------- evaluation protocol


def fid_image_size(dataset: str, n_samples: int, image_size: int | None) -> int:
    """Check the dataset and sample count of an FID measurement, and return the image size."""
    if dataset not in DATASET_DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_DEFAULTS)}")
    if n_samples == 1 or n_samples < 0:
        raise ValueError(f"n_samples={n_samples}: FID needs at least 2 samples (0 skips it)")
    return image_size or DATASET_DEFAULTS[dataset]["image_size"]


def draw_fid_samples(
    model: Callable,
    diffusion: Diffusion,
    *,
    dataset: str,
    steps: int,
    sampler: str,
    n_samples: int,
    seed: int,
    out_dir: str | Path,
    batch_size: int,
    eta: float = 0.0,
    image_size: int | None = None,
    worker: tuple[int, int] | None = None,
) -> Path | None:
    """Draw the samples that evaluate() with the same arguments measures, into <out_dir>/samples.

    Returns the folder, or None when `n_samples` is 0. `worker` (i, n) makes the shards of worker
    i, as in generate_samples. By default, under an initialised torch.distributed process group,
    each rank makes its share, worker (rank, world size), and then waits at a barrier for the
    other ranks, so every rank returns with the folder complete. Every rank must then pass a
    model with the same weights. Without a process group this process makes every shard. Shard
    seeds do not depend on the split, so the samples are the same either way.
    """
    image_size = fid_image_size(dataset, n_samples, image_size)
    if n_samples == 0:
        return None
    shared = worker is None and dist.is_initialized()
    if worker is None:
        worker = (dist.get_rank(), dist.get_world_size()) if shared else (0, 1)
    sample_dir = generate_samples(
        model,
        diffusion,
        Path(out_dir) / "samples",
        n_samples=n_samples,
        image_size=image_size,
        steps=steps,
        sampler=sampler,
        seed=seed,
        batch_size=batch_size,
        eta=eta,
        worker=worker,
    )
    if shared:
        # No rank may go on to measure the samples before every rank has saved its shards.
        dist.barrier()
    return sample_dir


def evaluate(
    model: Callable,
    diffusion: Diffusion,
    *,
    dataset: str,
    data_root: str | Path,
    steps: int,
    sampler: str,
    n_samples: int,
    seed: int,
    out_dir: str | Path,
    inception: str | Path | None = None,
    batch_size: int,
    eta: float = 0.0,
    image_size: int | None = None,
) -> dict:
    """Sample `n_samples` images, then measure their FID and IS against the training set.

    Samples go to `<out_dir>/samples` and resume from the shards already there, and this process
    makes every missing shard. Under torchrun, call draw_fid_samples with the same arguments on
    every rank first, so that the ranks share the sampling, and then evaluate on one rank.
    `image_size` defaults to the dataset's; a model of another size is compared with training
    images resized to its size. `n_samples=0` skips the measurement. Without Inception weights,
    or when skipped, `fid` and `is_mean` are None and `not_computed` gives the reason, and no
    number from other weights takes their place. With fewer than 10 samples only the IS is None.
    The result also contains the protocol.
    """
    image_size = fid_image_size(dataset, n_samples, image_size)
    result = {
        "fid": None,
        "is_mean": None,
        "is_std": None,
        "not_computed": None,
        "n_samples": n_samples,
        "sampler": sampler,
        "steps": steps,
        "eta": eta,
        "seed": seed,
        "image_size": image_size,
        "samples": None,
        "reference": None,
        "inception_sha256": None,
    }
    if n_samples == 0:
        result["not_computed"] = "skipped: 0 samples requested"
        return result

    sample_dir = draw_fid_samples(
        model,
        diffusion,
        dataset=dataset,
        steps=steps,
        sampler=sampler,
        n_samples=n_samples,
        seed=seed,
        out_dir=out_dir,
        batch_size=batch_size,
        eta=eta,
        image_size=image_size,
        worker=(0, 1),
    )
    result["samples"] = str(sample_dir)

    try:
        network, weights_sha256 = load_inception(inception, model_device(model, diffusion))
    except InceptionWeightsNotFound as error:
        warn(f"FID and IS not computed: {error}")
        result["not_computed"] = str(error)
        return result

    mu_ref, cov_ref, reference = reference_statistics(
        dataset, data_root, network, weights_sha256, batch_size=batch_size, image_size=image_size
    )
    features, logits = inception_outputs(
        network, sample_shard_batches(sample_dir), n_samples, batch_size
    )
    mu, cov = fid_statistics(features)
    result.update(
        fid=frechet_distance(mu, cov, mu_ref, cov_ref),
        reference={k: reference[k] for k in ("dataset", "split", "n_images")},
        inception_sha256=weights_sha256,
    )
    if n_samples < IS_SPLITS:
        result["not_computed"] = f"IS needs at least {IS_SPLITS} samples, got {n_samples}"
    else:
        result["is_mean"], result["is_std"] = inception_score(logits)
    return result


def format_fid(quality: dict | None) -> str:
    """Format the FID of an evaluate() result for a table cell, "n/a" when it is missing."""
    if quality is None or quality["fid"] is None:
        return "n/a"
    return f"{quality['fid']:.2f}"


def format_is(quality: dict | None) -> str:
    """Format the IS of an evaluate() result as mean ± std, "n/a" when it is missing."""
    if quality is None or quality["is_mean"] is None:
        return "n/a"
    return f"{quality['is_mean']:.2f} ± {quality['is_std']:.2f}"


def format_protocol(result: dict) -> str:
    """Format an evaluate() result as one table line with its protocol."""
    if result["fid"] is None:
        scores = f"FID and IS not computed ({result['not_computed']})"
    elif result["is_mean"] is None:
        scores = f"FID {result['fid']:.2f} | IS not computed (fewer than {IS_SPLITS} samples)"
    else:
        scores = f"FID {result['fid']:.2f} | IS {result['is_mean']:.2f} ± {result['is_std']:.2f}"
    protocol = (
        f"{result['n_samples']:,} samples, {result['sampler']} {result['steps']} steps, "
        f"seed {result['seed']}"
    )
    reference = result["reference"]
    if reference is None:
        return f"{scores} | {protocol}"
    return (
        f"{scores} | {protocol} | vs {reference['n_images']:,} {reference['dataset']} "
        f"{reference['split']} images | Inception sha256 {result['inception_sha256'][:8]}"
    )


# ---------------------------------------------------------------------------- NLL


def nll_statistics(
    model: Callable,
    diffusion: Diffusion,
    images: torch.Tensor,
    batch_size: int,
    seed: int = 0,
) -> dict:
    """Compute the variational-bound NLL of uint8 images (N, 3, H, W), per image.

    Returns the mean and std over images in bits/dim and nats/image, and the image count.
    The noise of each q(x_t | x_0) draw comes from a generator seeded with `seed`.
    """
    device = model_device(model, diffusion)
    generator = torch.Generator(device).manual_seed(seed)
    bpd, nats = [], []
    progress = Progress(len(images), "nll", unit="img")
    for batch in images.split(batch_size):
        result = diffusion.nll(model, to_model_range(batch).to(device), generator=generator)
        bpd.append(result["bpd"].double().cpu())
        nats.append(result["nats"].double().cpu())
        progress.update(len(batch))
    progress.close()
    bpd, nats = torch.cat(bpd), torch.cat(nats)

    # The sample std over images; one image has none.
    has_spread = len(bpd) > 1
    return {
        "bpd_mean": float(bpd.mean()),
        "bpd_std": float(bpd.std()) if has_spread else float("nan"),
        "nats_mean": float(nats.mean()),
        "nats_std": float(nats.std()) if has_spread else float("nan"),
        "n_images": len(bpd),
    }


# ---------------------------------------------------------------------------- command line


def parse_worker(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        worker = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid worker {text!r}; use i/n, e.g. 0/4") from None
    if not 0 <= worker[0] < worker[1]:
        raise argparse.ArgumentTypeError(f"invalid worker {text!r}; need 0 <= i < n")
    return worker


def parse_args(argv=None) -> argparse.Namespace:
    formatter = HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_inception(sub):
        sub.add_argument(
            "--inception",
            help="FID Inception weights, pytorch-fid's .pth or a converted .safetensors "
            "(None: the cached official file, downloaded when missing)",
        )

    def add_device(sub):
        sub.add_argument(
            "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
        )

    def add_model(sub):
        sub.add_argument("--checkpoint", required=True, help="model .safetensors file")
        sub.add_argument("--weights", choices=("ema", "model"), default="ema", help="weight set")
        sub.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), required=True)

    def add_data(sub):
        sub.add_argument(
            "--data",
            default=os.environ.get("DDPM_DATA"),
            help="data folder, by default $DDPM_DATA (None: CIFAR-10 is downloaded)",
        )

    def add_sampling(sub):
        sub.add_argument("--out-dir", required=True, help="output folder; samples resume here")
        sub.add_argument(
            "--fid-samples",
            type=int,
            help="number of samples to generate (None: 50,000 for cifar10, 10,000 for celebahq)",
        )
        sub.add_argument("--steps", type=int, help="sampler steps (None: 1000)")
        sub.add_argument("--sampler", choices=SAMPLERS, help="sampler (None: ancestral)")
        sub.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale eta")
        sub.add_argument("--seed", type=int, default=0, help="seed of the sample noise")
        sub.add_argument(
            "--batch-size",
            type=int,
            help="images per shard and sampler call, which the samples depend on "
            "(None: 256 for cifar10, 16 for celebahq)",
        )

    def add_inception_batch_size(sub):
        sub.add_argument("--batch-size", type=int, default=100, help="images per Inception call")

    sub = commands.add_parser("fid", help="FID between two image folders or .npz statistics")
    sub.add_argument("paths", nargs=2, type=Path, help="image folders, sample folders or .npz")
    add_inception(sub)
    add_inception_batch_size(sub)
    add_device(sub)

    sub = commands.add_parser("is", help="Inception Score of an image or sample folder")
    sub.add_argument("path", type=Path, help="image folder or sample folder")
    sub.add_argument("--splits", type=int, default=IS_SPLITS, help="number of splits")
    add_inception(sub)
    add_inception_batch_size(sub)
    add_device(sub)

    sub = commands.add_parser("stats", help="FID statistics of a dataset's training images")
    sub.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), required=True)
    add_data(sub)
    sub.add_argument("--out", type=Path, required=True, help="output .npz file")
    add_inception(sub)
    add_inception_batch_size(sub)
    add_device(sub)

    sub = commands.add_parser("nll", help="variational-bound NLL in bits/dim")
    add_model(sub)
    add_data(sub)
    sub.add_argument(
        "--split", choices=("train", "test", "all"), help="images to measure (None: test)"
    )
    sub.add_argument("--n-images", type=int, help="use the first N images (None: all)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the q(x_t | x_0) noise")
    sub.add_argument("--batch-size", type=int, default=100, help="images per NLL batch")
    add_device(sub)

    sub = commands.add_parser("sample", help="generate samples for FID into resumable shards")
    add_model(sub)
    add_sampling(sub)
    sub.add_argument(
        "--worker", type=parse_worker, default=(0, 1), help="i/n: make shards k with k %% n == i"
    )
    add_device(sub)

    sub = commands.add_parser("eval", help="sample, then FID and IS against the training set")
    add_model(sub)
    add_data(sub)
    add_sampling(sub)
    add_inception(sub)
    add_device(sub)

    for sub in commands.choices.values():
        sub.formatter_class = formatter
    return parser.parse_args(argv)


def statistics_of(path: Path, args, inception_cache: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return FID statistics of a .npz file, or compute them from images with Inception."""
    if path.suffix == ".npz":
        return load_statistics(path)
    if "model" not in inception_cache:
        inception_cache["model"] = load_inception(args.inception, args.device)
    network, weights_sha256 = inception_cache["model"]
    batches, count, description = open_images(path, args.batch_size)
    features, _ = inception_outputs(network, batches, count, args.batch_size)
    mu, cov = fid_statistics(features)
    record = {
        "source": str(path),
        "n_images": count,
        "resize": INCEPTION_RESIZE,
        "weights_sha256": weights_sha256,
    }
    print(f"fid: {description}")
    return mu, cov, record


def run_fid(args) -> None:
    for path in args.paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; pass image folders or .npz statistics")
    inception_cache = {}
    mu1, cov1, record1 = statistics_of(args.paths[0], args, inception_cache)
    mu2, cov2, record2 = statistics_of(args.paths[1], args, inception_cache)
    warn_if_incomparable(record1, record2)
    fid = frechet_distance(mu1, cov1, mu2, cov2)
    counts = [record.get("n_images", "?") for record in (record1, record2)]
    print(f"FID {fid:.6g} | images {counts[0]} and {counts[1]} | {INCEPTION_RESIZE}")


def run_is(args) -> None:
    network, weights_sha256 = load_inception(args.inception, args.device)
    batches, count, description = open_images(args.path, args.batch_size)
    _, logits = inception_outputs(network, batches, count, args.batch_size)
    mean, std = inception_score(logits, args.splits)
    print(
        f"IS {mean:.6g} ± {std:.3g} | {args.splits} splits | {description} | "
        f"Inception sha256 {weights_sha256[:8]}"
    )


def run_stats(args) -> None:
    network, weights_sha256 = load_inception(args.inception, args.device)
    mu, cov, record = reference_statistics(
        args.dataset, args.data, network, weights_sha256, args.batch_size
    )
    save_statistics(args.out, mu, cov, record)
    print(f"stats: {record['n_images']:,} {args.dataset} {record['split']} images -> {args.out}")


def load_checkpoint(args) -> tuple[nn.Module, Diffusion]:
    model, diffusion_config = load_model(args.checkpoint, weights=args.weights, device=args.device)
    return model.eval().requires_grad_(False), Diffusion(diffusion_config, args.device)


def run_nll(args) -> None:
    model, diffusion = load_checkpoint(args)
    split = args.split or DATASET_DEFAULTS[args.dataset]["nll_split"]
    images, _ = load_dataset(args.dataset, args.data, split=split)
    if args.n_images is not None:
        images = images[: args.n_images]
    result = nll_statistics(model, diffusion, images, args.batch_size, args.seed)
    print(
        f"nll {args.dataset} {split} | {result['bpd_mean']:.4f} ± {result['bpd_std']:.4f} "
        f"bits/dim | {result['nats_mean']:.1f} ± {result['nats_std']:.1f} nats/image | "
        f"{result['n_images']:,} images | T={diffusion.T} | {args.weights} weights | "
        f"seed {args.seed} | mean ± std over images"
    )


def sampling_settings(args) -> dict:
    """Resolve the sampling flags against the dataset's defaults."""
    defaults = DATASET_DEFAULTS[args.dataset]
    return {
        "n_samples": args.fid_samples or defaults["fid_samples"],
        "steps": args.steps or defaults["steps"],
        "sampler": args.sampler or defaults["sampler"],
        "seed": args.seed,
        "batch_size": args.batch_size or defaults["sample_batch_size"],
    }


def run_sample(args) -> None:
    settings = sampling_settings(args)
    save_config(args.out_dir, {**vars(args), **settings})
    model, diffusion = load_checkpoint(args)
    sample_dir = generate_samples(
        model,
        diffusion,
        Path(args.out_dir) / "samples",
        image_size=DATASET_DEFAULTS[args.dataset]["image_size"],
        eta=args.eta,
        worker=args.worker,
        **settings,
    )
    print(f"sample: done, shards in {sample_dir}; FID: python metrics.py fid {sample_dir} STATS")


def run_eval(args) -> None:
    settings = sampling_settings(args)
    save_config(args.out_dir, {**vars(args), **settings})
    model, diffusion = load_checkpoint(args)
    result = evaluate(
        model,
        diffusion,
        dataset=args.dataset,
        data_root=args.data,
        out_dir=args.out_dir,
        inception=args.inception,
        eta=args.eta,
        **settings,
    )
    write_json(Path(args.out_dir) / "eval.json", result)
    log_event(args.out_dir, f"eval | {format_protocol(result)}", {"event": "eval", **result})


def main(argv=None) -> None:
    args = parse_args(argv)
    commands = {
        "fid": run_fid,
        "is": run_is,
        "stats": run_stats,
        "nll": run_nll,
        "sample": run_sample,
        "eval": run_eval,
    }
    try:
        commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
