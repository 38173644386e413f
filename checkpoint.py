"""Crash-safe model and training-state files in safetensors, never pickle.

A model file contains `model.<param>` tensors and, for trained models, `ema.<param>` tensors.
Its safetensors metadata carries the UNet config and the diffusion settings as JSON, so the
file alone rebuilds the model. Training checkpoints are `ckpt_<step:07d>.safetensors` with a
JSON sidecar of the same stem, and resumable runs add `ckpt_<step:07d>.train.safetensors` with
optimizer moments and RNG states. Every file is written to a temporary name, flushed, fsynced
and renamed, so a killed job or a full disk leaves the previous checkpoint readable.
"""

import glob
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from diffusion import DiffusionConfig

FORMAT = "ddpm-stability/1"


# ---------------------------------------------------------------- atomic writes


def temporary_prefix(path: Path) -> str:
    """Return the name prefix of this process's temporary files for `path`."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of `path` whose writer, a process on this host, has died."""
    host_prefix = f".{path.name}.{socket.gethostname()}"
    for stale in path.parent.glob(f"{glob.escape(host_prefix)}.*.tmp"):
        # The name is <host_prefix>.<pid>.<random>.tmp, and mkstemp's random part has no dots.
        prefix, pid, _ = stale.name.removesuffix(".tmp").rsplit(".", 2)
        if prefix != host_prefix or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except PermissionError:
            continue


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_path)`, fsync the result and rename it onto `path`.

    The temporary file is `.<name>.<host>.<pid>.<random>.tmp` beside `path`. It is deleted when
    `write` raises, for example on a full disk, and a later write of `path` deletes those that a
    killed process left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, record: dict) -> None:
    """Write `record` as indented JSON, atomically."""
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Return the plain module under torch.compile and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------- model files


def save_model(
    path: str | Path,
    model: torch.nn.Module,
    diffusion_config: DiffusionConfig,
    ema: torch.nn.Module | None = None,
    sidecar: dict | None = None,
) -> None:
    """Save model (and EMA) weights with their configs; write `sidecar` as JSON beside them."""
    path = Path(path)
    model = unwrap(model)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if ema is not None:
        for k, v in unwrap(ema).state_dict().items():
            tensors[f"ema.{k}"] = v.detach().contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "unet_config": json.dumps(model.config.to_dict()),
        "diffusion_config": json.dumps(diffusion_config.to_dict()),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    if sidecar is not None:
        write_json(path.with_suffix(".json"), sidecar)


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a model file's tensors and metadata; raise ValueError on a damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass an existing .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(
            f"checkpoint {path} is truncated or not a safetensors file ({err}); "
            "use an earlier checkpoint or convert the weights again"
        ) from err
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {metadata.get('format')!r}, expected {FORMAT!r}; "
            "convert diffusers weights with `python unet.py convert SRC DST`"
        )
    return tensors, metadata


def load_model(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """Build the UNet stored in `path` and return `(model, diffusion_config)`.

    `weights="ema"` loads the EMA weights when the file has them and the live weights otherwise.
    """
    # Imported here because unet.py imports this module to write converted checkpoints.
    from unet import UNet, UNetConfig

    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r} is not one of 'ema', 'model'")
    tensors, metadata = read_model_file(path)
    prefix = "ema." if weights == "ema" and any(k.startswith("ema.") for k in tensors) else "model."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model = UNet(UNetConfig.from_dict(json.loads(metadata["unet_config"])))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not match its own UNet config ({err}); the file is damaged"
        ) from err
    diffusion_config = DiffusionConfig.from_dict(json.loads(metadata["diffusion_config"]))
    return model.to(device), diffusion_config


# ---------------------------------------------------------------- training state


def save_training_state(path: str | Path, optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Save optimizer moments, RNG states and `extra` (JSON-serialisable) for an exact resume."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    state = optimizer.state_dict()
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            tensors[f"optimizer.{param_id}.{name}"] = torch.as_tensor(value).detach().cpu()
    metadata = {
        "format": FORMAT,
        "param_groups": json.dumps(state["param_groups"]),
        "extra": json.dumps(extra),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer moments and RNG states from `path`; return the saved `extra` dict."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(
            f"training state {path} is unreadable ({err}); resume from an earlier step"
        ) from err

    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": json.loads(metadata["param_groups"])}
    )

    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return json.loads(metadata["extra"])
