"""Hand-written DDPM UNet that computes the same function as diffusers' UNet2DModel.

The network of Ho et al. 2020 (arXiv 2006.11239, Appendix B), in the layout that google's hub
checkpoints google/ddpm-cifar10-32 and google/ddpm-celebahq-256 store: residual blocks with a
sinusoidal timestep embedding, single-head self-attention at one resolution, GroupNorm and SiLU.
Parameter names equal diffusers' UNet2DModel state-dict keys, so converting a checkpoint only
checks keys and shapes. Ho et al. 2020, Table 1, report FID 3.17 on CIFAR-10 for the model whose
weights google/ddpm-cifar10-32 carries.

    python unet.py fetch cifar10                     # download and convert google/ddpm-cifar10-32
    python unet.py convert SRC DST                   # diffusers directory or weights file -> DST
    python unet.py export SRC DIR                    # our model file -> diffusers directory

A model file is the safetensors format of checkpoint.py: `model.*` and `ema.*` tensors with the
UNet and diffusion configs as JSON metadata.
"""

import argparse
import json
import math
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from checkpoint import atomic_write, load_model, save_model, write_json
from diffusion import DiffusionConfig
from logs import HelpFormatter

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")

# Hub repositories of the pretrained models, by dataset name.
PRETRAINED_REPOS = {
    "cifar10": "google/ddpm-cifar10-32",
    "celebahq": "google/ddpm-celebahq-256",
}
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"

WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Older diffusers files use other names for the attention projections, with identical tensors.
LEGACY_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


# --------------------------------------------------------------------------- configuration


@dataclass
class UNetConfig:
    """UNet architecture, with the field names and meanings of diffusers' UNet2DModel config.

    The defaults describe google/ddpm-cifar10-32.
    """

    sample_size: int = 32  # training image height and width in pixels
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)  # channels at each resolution
    layers_per_block: int = 2  # residual blocks per resolution on the way down (one more going up)
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    norm_num_groups: int = 32  # GroupNorm groups in every norm layer
    norm_eps: float = 1e-6  # GroupNorm epsilon in every norm layer
    flip_sin_to_cos: bool = False  # timestep embedding order: False puts sin before cos
    freq_shift: int = 1  # frequencies are exp(-ln(10000) * i / (half - freq_shift))
    downsample_padding: int = 0  # 0: pad right and bottom by one, then a stride-2 conv
    mid_block_scale_factor: float = 1.0  # the middle block divides its residual sums by this
    dropout: float = 0.0  # dropout before the second conv of every residual block

    def __post_init__(self):
        self.norm_eps = float(self.norm_eps)
        self.mid_block_scale_factor = float(self.mid_block_scale_factor)
        self.dropout = float(self.dropout)
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first setting this UNet cannot build."""
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("block_out_channels is empty. Give one channel count per resolution.")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"block_out_channels {self.block_out_channels}, down_block_types "
                f"{self.down_block_types} and up_block_types {self.up_block_types} "
                "must have the same length"
            )

        for name in self.down_block_types:
            if name not in DOWN_BLOCK_TYPES:
                raise ValueError(
                    f"down block type {name!r} is not supported. Use one of {DOWN_BLOCK_TYPES}."
                )
        for name in self.up_block_types:
            if name not in UP_BLOCK_TYPES:
                raise ValueError(
                    f"up block type {name!r} is not supported. Use one of {UP_BLOCK_TYPES}."
                )

        for channels in self.block_out_channels:
            if channels % self.norm_num_groups != 0:
                raise ValueError(
                    f"block_out_channels entry {channels} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.block_out_channels[0] % 2 != 0:
            raise ValueError(
                f"block_out_channels[0]={self.block_out_channels[0]} must be even, because it "
                "is the width of the sin/cos timestep embedding"
            )

        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be at least 1")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding={self.downsample_padding} must be 0 or 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.sample_size % 2 ** (levels - 1) != 0:
            raise ValueError(
                f"sample_size={self.sample_size} must be divisible by {2 ** (levels - 1)}, "
                f"because the UNet halves the resolution {levels - 1} times"
            )

    def to_dict(self) -> dict:
        """Return the config as a JSON-serialisable dict (tuples become lists)."""
        values = asdict(self)
        for key, value in values.items():
            if isinstance(value, tuple):
                values[key] = list(value)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        """Build a config from `to_dict` output, raising ValueError that names unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown UNet config keys {unknown}. Known keys are {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_diffusers(cls, config_json: dict) -> "UNetConfig":
        """Map a diffusers UNet2DModel config.json, raising ValueError on unsupported settings."""
        class_name = config_json.get("_class_name", "UNet2DModel")
        if class_name != "UNet2DModel":
            raise ValueError(
                f"config.json describes a {class_name}, but conversion expects a UNet2DModel"
            )

        # Keys absent from config.json take UNet2DModel's defaults, as from_pretrained does.
        values = {**DIFFUSERS_DEFAULTS, **config_json}

        for key, supported in DIFFUSERS_FIXED_SETTINGS.items():
            if values[key] not in supported:
                raise ValueError(
                    f"config.json sets {key}={values[key]!r}, which this UNet does not "
                    f"implement. Supported values: {supported}"
                )
        sample_size = values["sample_size"]
        if isinstance(sample_size, list | tuple) and len(set(sample_size)) == 1:
            values["sample_size"] = sample_size[0]
        if not isinstance(values["sample_size"], int):
            raise ValueError(
                f"config.json sets sample_size={sample_size!r}, but this UNet needs one integer "
                "size for square images"
            )
        if values["attn_norm_num_groups"] not in (None, values["norm_num_groups"]):
            raise ValueError(
                f"config.json sets attn_norm_num_groups={values['attn_norm_num_groups']}, but "
                f"this UNet uses norm_num_groups={values['norm_num_groups']} in attention too"
            )
        ignored = sorted(k for k in config_json if k[0] != "_" and k not in DIFFUSERS_DEFAULTS)
        if ignored:
            # UNet2DModel.from_pretrained ignores them too.
            print(f"warning: ignoring unknown config.json keys {ignored}", file=sys.stderr)

        config = cls(**{f.name: values[f.name] for f in fields(cls)})
        check_single_head(config, values["attention_head_dim"])
        embedding_dim = values["time_embedding_dim"]
        if embedding_dim not in (None, 4 * config.block_out_channels[0]):
            raise ValueError(
                f"config.json sets time_embedding_dim={embedding_dim}, but this UNet uses "
                f"4 * block_out_channels[0] = {4 * config.block_out_channels[0]}"
            )
        return config

    def to_diffusers(self) -> dict:
        """Return the diffusers UNet2DModel config.json that builds the same network."""
        settings = {key: supported[0] for key, supported in DIFFUSERS_FIXED_SETTINGS.items()}
        return {
            "_class_name": "UNet2DModel",
            **settings,
            **self.to_dict(),
            "attention_head_dim": None,
            "attn_norm_num_groups": None,
            "time_embedding_dim": None,
        }


# UNet2DModel defaults of the keys that from_diffusers reads (diffusers 0.42 signature).
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,  # read only by the "learned" time embedding
}

# UNet2DModel settings that this UNet implements only one way. Export writes the first value.
DIFFUSERS_FIXED_SETTINGS = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}


def attention_channels(config: UNetConfig) -> list[int]:
    """List the channel count of every attention layer, middle block included."""
    channels = [
        c
        for c, b in zip(config.block_out_channels, config.down_block_types, strict=True)
        if b.startswith("Attn")
    ]
    reversed_channels = config.block_out_channels[::-1]
    channels += [
        c
        for c, b in zip(reversed_channels, config.up_block_types, strict=True)
        if b.startswith("Attn")
    ]
    return channels + [config.block_out_channels[-1]]


def check_single_head(config: UNetConfig, attention_head_dim: int | None) -> None:
    """Raise ValueError unless `attention_head_dim` gives one head in every attention layer."""
    if attention_head_dim is None:
        return
    wider = sorted({c for c in attention_channels(config) if c != attention_head_dim})
    if wider:
        raise ValueError(
            f"config.json sets attention_head_dim={attention_head_dim}, which splits attention "
            f"layers of {wider} channels into several heads, but this UNet implements single-head "
            "attention (attention_head_dim null)"
        )


# Ho et al. 2020 trained CIFAR-10 with dropout 0.1 and CelebA-HQ without dropout. The hub
# config.json files omit dropout, so files converted from them have dropout 0.0.
PRESETS = {
    "cifar10": UNetConfig(dropout=0.1),
    "celebahq": UNetConfig(
        sample_size=256,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=(
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
        ),
    ),
    # 32x32 model for CPU demos and tests, attention at 16x16 like the CIFAR-10 model:
    # 1.11M parameters and 0.51 GFLOP per image (CIFAR-10 model: 35.7M and 12.1 GFLOP).
    "tiny": UNetConfig(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        dropout=0.1,
    ),
}


# --------------------------------------------------------------------------- building blocks


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: int):
    """Embed integer timesteps (B,) as (B, dim) sinusoids, Vaswani et al. 2017, section 3.5."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    frequencies = torch.exp(-math.log(10000.0) * exponent)
    angles = t.float()[:, None] * frequencies[None, :]  # (B, half)
    if flip_sin_to_cos:
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimestepMLP(nn.Module):
    """Two linear layers with SiLU between them, applied to the sinusoidal embedding."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Residual block: two GroupNorm-SiLU-conv stages with the timestep embedding added between."""

    def __init__(self, in_channels, out_channels, config: UNetConfig, output_scale=1.0):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(4 * config.block_out_channels[0], out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the block to x, given the timestep embedding `emb` (B, E) after its SiLU."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, config: UNetConfig, output_scale=1.0):
        super().__init__()
        self.group_norm = nn.GroupNorm(config.norm_num_groups, channels, eps=config.norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # In channels_last, this view is already contiguous.
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)

        # One head as wide as the channels, so the logits are scaled by 1/sqrt(C).
        q = self.to_q(h)[:, None]  # (B, 1, H*W, C)
        k = self.to_k(h)[:, None]
        v = self.to_v(h)[:, None]
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H*W, C)

        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return (x + h) / self.output_scale


class Downsample(nn.Module):
    """Stride-2 3x3 conv that halves the resolution.

    Padding 0 pads only the right and bottom edges by one pixel, which is what TensorFlow's
    "SAME" padding does for this conv on even sizes. Padding 1 pads all edges.
    """

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)
        self.pad_right_bottom = padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One resolution of the encoder, returning its output and the activations for the decoder."""

    def __init__(self, in_channels, out_channels, config: UNetConfig, attention, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config)
            for i in range(config.layers_per_block)
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(out_channels, config) for _ in self.resnets if attention
        )
        self.downsamplers = nn.ModuleList(
            [Downsample(out_channels, config.downsample_padding)] if downsample else []
        )

    def forward(self, x, emb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        channels, scale = config.block_out_channels[-1], config.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, config, scale) for _ in range(2)
        )
        self.attentions = nn.ModuleList([AttentionBlock(channels, config, scale)])

    def forward(self, x, emb):
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """One resolution of the decoder, where each residual block takes one encoder activation."""

    def __init__(self, skip_channels, in_channels, out_channels, config, attention, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock((in_channels if i == 0 else out_channels) + skip, out_channels, config)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(out_channels, config) for _ in self.resnets if attention
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x, skips, emb):
        """Apply the block, consuming activations from the end of the list `skips`."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attentions:
                x = self.attentions[i](x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


# --------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    """Noise-prediction UNet: forward(x_t, t) -> eps_pred.

    The activations run in channels_last (NHWC), the layout that GPU tensor-core convolutions
    use, and eps_pred comes back contiguous like the usual NCHW input. The weights stay in the
    layout they were created or loaded in. For inference, `model.to(memory_format=
    torch.channels_last)` puts them in the activations' layout once. Training keeps them
    contiguous, because the optimizer moments inherit the layout and safetensors saves only
    contiguous tensors.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        levels = len(channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepMLP(channels[0], 4 * channels[0])

        # Encoder. skip_channels lists the channels of every activation the decoder will reuse.
        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]
        for i, block_type in enumerate(config.down_block_types):
            in_channels = channels[max(i - 1, 0)]
            downsample = i < levels - 1
            self.down_blocks.append(
                DownBlock(
                    in_channels, channels[i], config, block_type == "AttnDownBlock2D", downsample
                )
            )
            skip_channels += [channels[i]] * (config.layers_per_block + int(downsample))

        self.mid_block = MidBlock(config)

        # Decoder, lowest resolution first, with one more residual block per level than the encoder.
        self.up_blocks = nn.ModuleList()
        in_channels = channels[-1]
        for i, block_type in enumerate(config.up_block_types):
            out_channels = channels[levels - 1 - i]
            block_skip_channels = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            upsample = i < levels - 1
            self.up_blocks.append(
                UpBlock(
                    block_skip_channels,
                    in_channels,
                    out_channels,
                    config,
                    block_type == "AttnUpBlock2D",
                    upsample,
                )
            )
            in_channels = out_channels

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Predict eps from x_t (B, C, H, W) in [-1, 1] and int64 timesteps t, shape (B,) or ()."""
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if x.shape[-1] % factor != 0 or x.shape[-2] % factor != 0:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected () or ({x.shape[0]},)")

        # Every residual block applies SiLU to the embedding first, so apply it once here.
        c = self.config
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = F.silu(self.time_embedding(emb.to(x.dtype)))

        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips += block_skips
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        eps_pred = self.conv_out(F.silu(self.conv_norm_out(h)))
        return eps_pred.contiguous()


# --------------------------------------------------------------------------- diffusers conversion


def diffusion_config_from_scheduler(scheduler_json: dict) -> DiffusionConfig:
    """Map a DDPMScheduler scheduler_config.json, raising ValueError on other schedules."""
    # DDPMScheduler defaults (diffusers 0.42) for keys the file omits.
    values = {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "thresholding": False,
        **scheduler_json,
    }
    required = {
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "thresholding": False,
    }
    for key, expected in required.items():
        if values[key] != expected:
            raise ValueError(
                f"scheduler_config.json sets {key}={values[key]!r}, but this code supports only "
                f"{key}={expected!r}"
            )
    if values["variance_type"] not in ("fixed_small", "fixed_large"):
        raise ValueError(
            f"scheduler_config.json sets variance_type={values['variance_type']!r}, but this code "
            "supports 'fixed_small' and 'fixed_large'"
        )
    return DiffusionConfig(
        T=int(values["num_train_timesteps"]),
        beta_start=float(values["beta_start"]),
        beta_end=float(values["beta_end"]),
        variance_type=values["variance_type"],
        clip_sample=bool(values["clip_sample"]),
    )


def scheduler_config_from_diffusion(config: DiffusionConfig) -> dict:
    """Return the DDPMScheduler scheduler_config.json for `config`."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": config.T,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "beta_schedule": "linear",
        "variance_type": config.variance_type,
        "clip_sample": config.clip_sample,
        "prediction_type": "epsilon",
    }


def load_diffusers_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a diffusers state dict from .safetensors or .bin, renaming legacy attention keys."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif path.suffix == ".bin":
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"weights file {path} is neither .safetensors nor .bin")

    renamed = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if ".attentions." in f".{parent}." and leaf in LEGACY_ATTENTION_NAMES:
            key = f"{parent}.{LEGACY_ATTENTION_NAMES[leaf]}.{param}"
        renamed[key] = tensor
    return renamed


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise ValueError naming missing, unexpected and misshapen keys of `state`."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{key} {tuple(state[key].shape)} (expected {expected[key]})"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != expected[key]
    )
    if not (missing or unexpected or misshapen):
        return

    def listing(title: str, items: list[str]) -> str:
        text = ", ".join(items[:10])
        if len(items) > 10:
            text += f", and {len(items) - 10} more"
        return f"\n  {title} ({len(items)}): {text}"

    message = f"weights in {source} do not match the UNet built from its config.json:"
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("misshapen keys", misshapen),
    ):
        if items:
            message += listing(title, items)
    raise ValueError(message + "\nCheck that config.json belongs to these weights.")


def find_diffusers_files(
    src: Path, config_path: Path | None, scheduler_config_path: Path | None
) -> tuple[Path, Path, Path]:
    """Locate (config.json, weights, scheduler_config.json) of a diffusers checkpoint."""
    if src.is_file():
        weights = src
        config_path = config_path or src.parent / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"config.json for {src} not found at {config_path}. Pass it with --config PATH."
            )
    elif src.is_dir():
        candidates = [d / name for d in (src, src / "unet") for name in WEIGHTS_NAMES]
        found = [p for p in candidates if p.is_file() and (p.parent / "config.json").is_file()]
        if not found:
            raise FileNotFoundError(
                f"{src} contains no diffusers UNet. Expected config.json and "
                f"{' or '.join(WEIGHTS_NAMES)} in {src} or {src / 'unet'}"
            )
        weights = found[0]
        config_path = config_path or weights.parent / "config.json"
    else:
        raise FileNotFoundError(f"{src} not found. Pass a diffusers directory or weights file.")

    if scheduler_config_path is None:
        # A pipeline keeps the scheduler beside the UNet or in scheduler/ of its root.
        roots = [weights.parent]
        if weights.parent.name == "unet":
            roots.append(weights.parent.parent)
        searched = [
            p
            for r in roots
            for p in (r / "scheduler_config.json", r / "scheduler" / "scheduler_config.json")
        ]
        found = [p for p in searched if p.is_file()]
        if not found:
            # The noise schedule decides sampling and the bound, so it is never guessed.
            raise FileNotFoundError(
                "scheduler_config.json not found at "
                + ", ".join(str(p) for p in searched)
                + ". Pass its path with --scheduler-config PATH."
            )
        scheduler_config_path = found[0]
    return config_path, weights, scheduler_config_path


def convert(
    src: str | Path,
    dst: str | Path,
    config_path: str | Path | None = None,
    scheduler_config_path: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[UNetConfig, DiffusionConfig]:
    """Convert a diffusers UNet2DModel checkpoint to our model file at `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists. Choose another path or pass --overwrite.")
    config_path, weights_path, scheduler_path = find_diffusers_files(
        src,
        Path(config_path) if config_path else None,
        Path(scheduler_config_path) if scheduler_config_path else None,
    )
    unet_config = UNetConfig.from_diffusers(json.loads(config_path.read_text()))
    diffusion_config = diffusion_config_from_scheduler(json.loads(scheduler_path.read_text()))

    # Build on the meta device (no memory, no init) and adopt the loaded tensors.
    state = load_diffusers_weights(weights_path)
    with torch.device("meta"):
        model = UNet(unet_config)
    check_state_dict(model, state, weights_path)
    state = {key: value.float().contiguous() for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)

    save_model(dst, model, diffusion_config)
    return unet_config, diffusion_config


def export(src: str | Path, out_dir: str | Path, weights: str = "ema", overwrite=False) -> Path:
    """Write a model file as a diffusers directory that UNet2DModel.from_pretrained loads."""
    src, out_dir = Path(src), Path(out_dir)
    names = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")
    existing = [out_dir / name for name in names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists. Choose another directory or pass --overwrite."
        )

    model, diffusion_config = load_model(src, weights=weights)
    with safe_open(str(src), framework="pt") as f:
        has_ema = any(key.startswith("ema.") for key in f.keys())
    if weights == "ema" and not has_ema:
        print(f"{src} has no EMA weights, so its model weights are exported", file=sys.stderr)

    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    atomic_write(
        out_dir / "diffusion_pytorch_model.safetensors",
        lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
    )
    write_json(out_dir / "config.json", model.config.to_diffusers())
    write_json(out_dir / "scheduler_config.json", scheduler_config_from_diffusion(diffusion_config))
    return out_dir


# --------------------------------------------------------------------------- fetching from the hub

# Bytes per element of the safetensors dtypes.
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def check_safetensors_file(path: Path) -> None:
    """Raise ValueError unless the header parses and every tensor lies inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + header_size > size:
                raise ValueError(f"header length {header_size} exceeds the file size {size}")
            header = json.loads(f.read(header_size))
        data_size = size - 8 - header_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * SAFETENSORS_DTYPE_SIZES[info["dtype"]]
            if end - begin != nbytes or not 0 <= begin <= end <= data_size:
                raise ValueError(f"tensor {name} at bytes {begin}..{end} does not fit")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a complete safetensors file ({err}). Delete it and download again."
        ) from err


def hub_endpoint() -> str:
    """Return the hub address: env var HF_ENDPOINT, else https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_HUB_ENDPOINT).rstrip("/")


def hub_url(repo: str, filename: str) -> str:
    """Return the download URL of `filename` in hub repository `repo`."""
    return f"{hub_endpoint()}/{repo}/resolve/main/{filename}"


def download(url: str, dest: Path) -> bool:
    """Download `url` to `dest` via a temporary file. Return False if the server responds 404.

    Env var DDPM_OFFLINE=1 turns every download into a URLError, for air-gapped machines and CI.
    """
    if os.environ.get("DDPM_OFFLINE") == "1":
        raise urllib.error.URLError("downloads are off because DDPM_OFFLINE=1")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            print(
                f"downloading {url} ({int(length) / 1e6:.1f} MB)"
                if length
                else f"downloading {url}"
            )

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                if length is not None and tmp.stat().st_size != int(length):
                    raise OSError(
                        f"download of {url} stopped at {tmp.stat().st_size} of {length} bytes. "
                        "Run again."
                    )
                if dest.suffix == ".safetensors":
                    check_safetensors_file(tmp)
                elif dest.suffix == ".json":
                    json.loads(tmp.read_text())

            atomic_write(dest, write)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise OSError(f"download of {url} failed with HTTP status {err.code} {err.reason}") from err
    return True


def download_repo(repo: str, folder: Path) -> None:
    """Download the UNet config, weights and scheduler config of `repo` into `folder`."""
    # Pipelines store the UNet at the repository root or in unet/, and the scheduler beside it
    # or in scheduler/.
    unet_dirs = ("", "unet/")
    scheduler_files = ("scheduler_config.json", "scheduler/scheduler_config.json")

    if not (folder / "config.json").is_file():
        if not any(
            download(hub_url(repo, d + "config.json"), folder / "config.json") for d in unet_dirs
        ):
            raise FileNotFoundError(f"config.json not found in {repo} at the root or in unet/")
    if not any((folder / name).is_file() for name in WEIGHTS_NAMES):
        # NOTE: the .bin fallback is for repositories without safetensors weights. Its download
        # is checked only by size, and conversion then loads it with weights_only=True.
        tried = [d + name for d in unet_dirs for name in WEIGHTS_NAMES]
        if not any(download(hub_url(repo, path), folder / Path(path).name) for path in tried):
            raise FileNotFoundError(f"no UNet weights found in {repo} at {tried}")
    if not (folder / "scheduler_config.json").is_file():
        dest = folder / "scheduler_config.json"
        if not any(download(hub_url(repo, path), dest) for path in scheduler_files):
            raise FileNotFoundError(
                f"scheduler_config.json not found in {repo} at {scheduler_files}"
            )


def default_cache_dir() -> Path:
    """Return env var DDPM_CACHE, else ~/.cache/ddpm-stability."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm-stability")


def pretrained_path(dataset: str, cache_dir: str | Path | None = None) -> Path:
    """Return our converted model file of google's pretrained DDPM for `dataset`.

    Downloads and converts once. The cache directory is `cache_dir` (the --cache-dir flag of
    scripts that have one), else env var DDPM_CACHE, else ~/.cache/ddpm-stability. The hub
    files go to <cache>/downloads/<owner>--<name>/ and the converted file to
    <cache>/<owner>--<name>.safetensors. The hub address is env var HF_ENDPOINT, by default
    https://huggingface.co.
    """
    if dataset not in PRETRAINED_REPOS:
        raise ValueError(
            f"dataset {dataset!r} has no pretrained model. Use one of {list(PRETRAINED_REPOS)}."
        )
    repo = PRETRAINED_REPOS[dataset]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    converted = cache / f"{repo.replace('/', '--')}.safetensors"
    if converted.is_file():
        return converted

    folder = cache / "downloads" / repo.replace("/", "--")
    try:
        download_repo(repo, folder)
    except (urllib.error.URLError, TimeoutError) as err:
        raise ConnectionError(
            f"cannot download {repo} from {hub_endpoint()} ({err}). Offline, either copy "
            f"config.json, diffusion_pytorch_model.safetensors and scheduler_config.json from "
            f"the hub repository {repo} into {folder}/ and run again, or convert a local copy "
            "with `python unet.py convert SRC DST` (SRC: a directory with config.json and the "
            "weights at its root or in unet/, and scheduler_config.json beside them) and pass "
            "DST with --teacher PATH (distill.py) or --base PATH (robust.py, unlearn.py)"
        ) from err

    convert(folder, converted, overwrite=True)
    print(f"converted {repo} to {converted}")
    return converted


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    formatter = HelpFormatter
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    convert_parser = commands.add_parser(
        "convert", help="convert a diffusers UNet2DModel checkpoint", formatter_class=formatter
    )
    convert_parser.add_argument(
        "src",
        type=Path,
        help="diffusers directory (config.json and weights at its root or in unet/) or a "
        ".safetensors/.bin weights file",
    )
    convert_parser.add_argument("dst", type=Path, help="output model file (.safetensors)")
    convert_parser.add_argument(
        "--config", type=Path, help="config.json of the weights (if omitted, the one beside them)"
    )
    convert_parser.add_argument(
        "--scheduler-config",
        type=Path,
        help="scheduler_config.json (if omitted, searched beside the weights, in scheduler/ "
        "beside them, and in the pipeline root when the weights are in unet/)",
    )
    convert_parser.add_argument("--overwrite", action="store_true", help="replace an existing dst")

    export_parser = commands.add_parser(
        "export", help="write a model file as a diffusers directory", formatter_class=formatter
    )
    export_parser.add_argument("src", type=Path, help="our model file (.safetensors)")
    export_parser.add_argument("dir", type=Path, help="output diffusers directory")
    export_parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="weights to export (ema falls back to model when the file has no EMA)",
    )
    export_parser.add_argument(
        "--overwrite", action="store_true", help="replace existing files in dir"
    )

    fetch_parser = commands.add_parser(
        "fetch", help="download and convert a google DDPM", formatter_class=formatter
    )
    fetch_parser.add_argument(
        "dataset", choices=sorted(PRETRAINED_REPOS), help="dataset of the pretrained model"
    )
    fetch_parser.add_argument(
        "--cache-dir",
        type=Path,
        help="cache directory (if omitted, env var DDPM_CACHE, else ~/.cache/ddpm-stability)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run_command(args)
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")


def run_command(args: argparse.Namespace) -> None:
    """Run the convert, export or fetch command."""
    if args.command == "convert":
        unet_config, diffusion_config = convert(
            args.src, args.dst, args.config, args.scheduler_config, args.overwrite
        )
        print(f"unet_config {json.dumps(unet_config.to_dict())}")
        print(f"diffusion_config {json.dumps(diffusion_config.to_dict())}")
        print(f"wrote {args.dst}")
    elif args.command == "export":
        export(args.src, args.dir, args.weights, args.overwrite)
        print(f"wrote {args.dir}")
    else:
        print(pretrained_path(args.dataset, args.cache_dir))


if __name__ == "__main__":
    main()
