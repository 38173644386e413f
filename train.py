"""Train a DDPM from scratch or continue one, and hold the training loop every script shares.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239, Appendix B: Adam at
lr 2e-4 with 5,000 warmup steps, batch 128, dropout 0.1, gradient clipping at 1.0 and an EMA of
decay 0.9999 for CIFAR-10 (FID 3.17 after 800k steps, Table 1); lr 2e-5 and batch 64 for
CelebA-HQ. This script uses AdamW with weight decay 0, which is Adam.

    python train.py --dataset cifar10 --data DATA_DIR --preset tiny --steps 3000 --out runs/tiny

The loop in `train_loop` is shared with robust.py and unlearn.py. It draws every step's timesteps
and noise from a generator seeded by (seed, step), so a resumed run, or a run split across
`torchrun` processes, sees the same t and eps as an uninterrupted single-process run.
"""

import argparse
import contextlib
import copy
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import load_model, load_training_state, save_model, save_training_state, unwrap
from data import BatchIterator, load_dataset
from diffusion import Diffusion, DiffusionConfig
from logs import HelpFormatter, log_event, save_config
from unet import PRESETS, UNet

FORMAT_VERSION = 1

# Ho et al. 2020, Appendix B. CelebA-HQ used dropout 0.0 (google/ddpm-celebahq-256 training).
PAPER_SETTINGS = {
    "cifar10": dict(lr=2e-4, batch_size=128, steps=800_000, warmup=5000, dropout=0.1),
    "celebahq": dict(lr=2e-5, batch_size=64, steps=500_000, warmup=5000, dropout=0.0),
}

# Autocast precisions of --amp; "off" runs float32.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- run-time helpers


def select_device(name: str | None = None) -> torch.device:
    """Return the requested device, or this process's GPU under torchrun, or the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast(amp: str, device: torch.device):
    """Return the autocast context for `amp` in {"bf16", "fp16", "off"}."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r} is not one of {[*AMP_DTYPES, 'off']}")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def default_amp(device: torch.device) -> str:
    """Return the default autocast: bf16 on GPUs, off (fp32) elsewhere."""
    return "bf16" if device.type == "cuda" else "off"


def default_compile(device: torch.device) -> bool:
    """Return whether torch.compile is on by default: on CUDA, off elsewhere.

    On a 2-core AMD EPYC CPU at batch 16 in fp32, compiling took 30-80 s for the tiny and the
    CIFAR-10 UNet and made a forward 0-14% faster, which a short CPU job does not earn back.
    """
    return device.type == "cuda"


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Add --amp, --compile and --device, the run-time flags every script shares."""
    parser.add_argument(
        "--amp",
        choices=[*AMP_DTYPES, "off"],
        help="autocast precision of the UNet: bf16, fp16 (sampling and evaluation only, because "
        "training has no gradient scaler) or off for float32 (default: bf16 on GPU, else off)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the UNet, with CUDA graphs for sampling on GPU (default: on for GPU; "
        "off on CPU, where compiling took 30-80 s and saved at most 14%% per forward)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available)")


def resolve_runtime(args: argparse.Namespace, training: bool = True) -> torch.device:
    """Fill in the defaults of --amp, --compile and --device; return the device.

    Raises ValueError for --amp fp16 when `training`, because no training loop here scales its
    loss, and fp16 gradients of small losses underflow to zero without a GradScaler.
    """
    device = select_device(args.device)
    args.device = str(device)
    args.amp = args.amp or default_amp(device)
    if training and args.amp == "fp16":
        raise ValueError(
            "--amp fp16 is for sampling and evaluation only, because training has no gradient "
            "scaler; use --amp bf16 or --amp off"
        )
    args.compile = default_compile(device) if args.compile is None else args.compile
    return device


def eps_model(model: torch.nn.Module, amp: str, compile: bool) -> Callable:
    """Wrap `model` as the `model(x_t, t) -> eps_pred` callable that diffusion.py expects.

    The callable is meant for inference. With `compile` on CUDA, torch.compile's
    "reduce-overhead" mode captures the forward of each batch shape as a CUDA graph and replays
    it, so a sampling step costs one graph launch instead of one launch per kernel.
    """
    device = next(model.parameters()).device
    cuda_graphs = compile and device.type == "cuda"
    net = model
    if compile:
        net = torch.compile(model, mode="reduce-overhead" if cuda_graphs else "default")

    def run(x_t, t):
        # NOTE: the CUDA-graph path has not been run, because the test machines have no GPU.
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(amp, device):
            eps_pred = net(x_t, t)
        # The next replay overwrites a graph's output buffer, so the caller gets a copy.
        return eps_pred.clone() if cuda_graphs else eps_pred

    return run


def set_dropout(model: UNet, p: float) -> None:
    """Set the dropout probability of every dropout layer and of the model's config."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def step_seed(seed: int, step: int) -> int:
    """Derive an independent 63-bit seed for one training step with numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun; return (rank, world_size)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------- checkpoints


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:07d}.safetensors"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """Return the highest-step checkpoint in `out_dir` that has a training state beside it."""
    found = []
    for path in Path(out_dir).glob("ckpt_*.safetensors"):
        match = re.fullmatch(r"ckpt_(\d{7})\.safetensors", path.name)
        if match and path.with_suffix(".train.safetensors").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def check_same_architecture(path: Path, saved: UNet, model: UNet) -> None:
    """Raise ValueError when the UNet saved in `path` differs from `model` beyond dropout."""
    saved_config, config = saved.config.to_dict(), model.config.to_dict()
    differences = [
        f"{key}={saved_config.get(key)!r} (this run: {value!r})"
        for key, value in config.items()
        if key != "dropout" and saved_config.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {path}: its UNet has {', '.join(differences)}; "
            "resume with the model settings of that run, or choose a new --out"
        )


@dataclass
class TrainConfig:
    """Settings of one `train_loop` run."""

    steps: int  # optimizer steps in total
    batch_size: int  # global batch size across all processes
    lr: float  # peak learning rate
    warmup: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.9999  # EMA decay, warmed up as min(decay, (1 + step) / (10 + step))
    log_every: int = 100  # steps per log line
    save_every: int = 0  # steps per rolling checkpoint (0: only checkpoint_steps and the end)
    checkpoint_steps: tuple[int, ...] = ()  # steps whose checkpoints are always kept
    seed: int = 0
    amp: str = "off"
    compile: bool = False


StepFn = Callable[..., torch.Tensor]


def ddpm_step(diffusion: Diffusion) -> StepFn:
    """Return the plain L_simple step: the mean loss over the local batch."""

    def step(model, x_0, t, eps):
        return diffusion.training_loss(model, x_0, t, eps).mean()

    return step


def train_loop(
    model: UNet,
    diffusion: Diffusion,
    batches: Iterator,
    config: TrainConfig,
    out_dir: str | Path,
    sidecar: dict,
    step_fn: StepFn | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    backward_fn: Callable | None = None,
    resume: bool = False,
    ema: UNet | None = None,
) -> tuple[UNet, UNet]:
    """Optimize `model` for `config.steps` steps and return `(model, ema)`.

    Each step draws a global batch from `batches` (a tensor, or a tuple of tensors of equal
    batch size), applies `augment(batch, generator)` to it, draws t and eps for the global batch
    from the step's generator, keeps this process's share, and calls
    `step_fn(model, *batch, t, eps) -> loss`. The loop calls `loss.backward()`, unless
    `backward_fn(model, loss_parts)` is given, in which case `step_fn` returns what
    `backward_fn` needs and `backward_fn` fills the gradients and returns the logged loss.
    A non-finite loss or gradient norm stops the run with the step and the value; the last
    checkpoint written stays as it was.
    """
    out_dir = Path(out_dir)
    if config.amp == "fp16":
        raise ValueError(
            "amp='fp16' is not supported for training, because this loop has no gradient scaler; "
            "use 'bf16' or 'off'"
        )
    device = next(model.parameters()).device
    rank, world = setup_distributed(device)
    step_fn = step_fn or ddpm_step(diffusion)
    if config.batch_size % world:
        raise ValueError(
            f"batch size {config.batch_size} is not divisible by {world} processes; "
            "choose a batch size that is a multiple of the process count"
        )

    # The EMA starts from the weights training starts from.
    ema = ema if ema is not None else copy.deepcopy(unwrap(model))
    ema.requires_grad_(False).eval()
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
    )

    # Resume model, EMA, optimizer, RNG and data position from the latest complete checkpoint.
    start = 0
    if resume:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(
                f"--resume found no checkpoint with training state in {out_dir}; "
                "drop --resume to start a new run"
            )
        resumed, _ = load_model(path, weights="model", device=device)
        check_same_architecture(path, resumed, unwrap(model))
        model.load_state_dict(resumed.state_dict())
        resumed_ema, _ = load_model(path, weights="ema", device=device)
        ema.load_state_dict(resumed_ema.state_dict())
        extra = load_training_state(path.with_suffix(".train.safetensors"), optimizer)
        batches.load_state_dict(extra["batches"])
        start = extra["step"]
        log_event(
            out_dir if rank == 0 else None,
            f"resumed from {path} at step {start}",
            {"event": "resume", "path": str(path), "step": start},
        )

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if config.compile:
        net = torch.compile(net)

    def run(x_t, t):
        with autocast(config.amp, device):
            return net(x_t, t)

    interval_loss, interval_start, interval_steps = 0.0, time.perf_counter(), 0
    last_saved = None
    for step in range(start + 1, config.steps + 1):
        # Global batch, augmentation, timesteps and noise from this step's generator.
        generator = torch.Generator(device=device).manual_seed(step_seed(config.seed, step))
        batch = next(batches)
        parts = batch if isinstance(batch, tuple) else (batch,)
        parts = tuple(part.to(device, non_blocking=True) for part in parts)
        if augment is not None:
            parts = tuple(augment(part, generator) for part in parts)
        global_batch = parts[0].shape[0]
        t = torch.randint(0, diffusion.T, (global_batch,), device=device, generator=generator)
        eps = torch.randn(parts[0].shape, device=device, generator=generator)

        # This process's share: rows rank, rank + world, ...
        share = slice(rank, None, world)
        parts = tuple(part[share] for part in parts)
        t, eps = t[share], eps[share]

        # Forward, backward, divergence guard, clipping, update.
        lr = config.lr * min(1.0, step / config.warmup) if config.warmup else config.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        output = step_fn(run, *parts, t, eps)
        if backward_fn is None:
            output.backward()
            loss = output.detach()
        else:
            loss = backward_fn(model, output)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if world > 1:
            dist.all_reduce(loss)
            loss = loss / world
        loss_value, grad_value = loss.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            kept = last_saved or latest_checkpoint(out_dir) or "none yet"
            raise FloatingPointError(
                f"training diverged at step {step}: loss {loss_value}, gradient norm "
                f"{grad_value}; the last good checkpoint is {kept}. Lower --lr or resume from it"
            )
        optimizer.step()

        # EMA with the warmup of TensorFlow's ExponentialMovingAverage(num_updates).
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unwrap(model).parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)

        # One log line per interval, with the interval's mean loss.
        interval_loss += loss_value
        interval_steps += 1
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - interval_start
            ms_per_step = 1000 * elapsed / interval_steps
            record = {
                "step": step,
                "loss": interval_loss / interval_steps,
                "grad_norm": grad_value,
                "lr": lr,
                "ms_per_step": ms_per_step,
                "img_per_s": config.batch_size * interval_steps / elapsed,
            }
            line = (
                f"step {step}/{config.steps} | loss {record['loss']:.4f} | "
                f"grad_norm {grad_value:.2f} | lr {lr:.1e} | {ms_per_step:.0f} ms/step | "
                f"{record['img_per_s']:.0f} img/s"
            )
            if rank == 0:
                log_event(out_dir, line, record)
            interval_loss, interval_start, interval_steps = 0.0, time.perf_counter(), 0

        # Checkpoints: the kept steps, the rolling one, and the last step.
        keep = step in config.checkpoint_steps or step == config.steps
        rolling = config.save_every and step % config.save_every == 0
        if rank == 0 and (keep or rolling):
            path = checkpoint_path(out_dir, step)
            save_model(
                path,
                model,
                diffusion.config,
                ema=ema,
                sidecar={
                    **sidecar,
                    "format_version": FORMAT_VERSION,
                    "step": step,
                    "train_config": asdict(config),
                    "model_config": unwrap(model).config.to_dict(),
                    "loss": loss_value,
                },
            )
            save_training_state(
                path.with_suffix(".train.safetensors"),
                optimizer,
                {"step": step, "batches": batches.state_dict()},
            )
            # Drop the previous rolling checkpoint only once the new one is on disk.
            if last_saved is not None and last_saved["rolling"]:
                for suffix in (".safetensors", ".json", ".train.safetensors"):
                    last_saved["path"].with_suffix(suffix).unlink(missing_ok=True)
            last_saved = {"path": path, "rolling": not keep}
        if world > 1 and (keep or rolling):
            dist.barrier()
    return model, ema


# ---------------------------------------------------------------- script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(PAPER_SETTINGS), default="cifar10")
    parser.add_argument("--data", help="dataset folder; CIFAR-10 is downloaded when omitted")
    parser.add_argument("--out", default="runs/train", help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="UNet preset for a new model")
    parser.add_argument("--init", help="checkpoint to continue training from")
    parser.add_argument("--image-size", type=int, help="resize images to this size in pixels")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, help="global batch size")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--warmup", type=int, help="linear learning-rate warmup steps")
    parser.add_argument("--dropout", type=float, help="UNet dropout probability")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    parser.add_argument("--log-every", type=int, default=100, help="steps per log line")
    parser.add_argument("--save-every", type=int, default=5000, help="steps per checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and noise")
    add_runtime_args(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue from --out's latest checkpoint"
    )
    args = parser.parse_args(argv)
    for key, value in PAPER_SETTINGS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.preset is None) == (args.init is None):
        parser.error("pass exactly one of --preset (new model) or --init CHECKPOINT (continue)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = resolve_runtime(args)
    torch.manual_seed(args.seed)
    rank, _ = setup_distributed(device)

    # Model: a new preset, or an existing checkpoint continued.
    if args.init:
        model, diffusion_config = load_model(args.init, weights="ema")
        set_dropout(model, args.dropout)
    else:
        config = PRESETS[args.preset]
        config = type(config).from_dict({**config.to_dict(), "dropout": args.dropout})
        if args.image_size:
            config.sample_size = args.image_size
        model, diffusion_config = UNet(config), DiffusionConfig()
    model.to(device)
    diffusion = Diffusion(diffusion_config, device)

    # Data: training split, optionally resized.
    size = args.image_size or model.config.sample_size
    images, _ = load_dataset(args.dataset, args.data, "train", size=size)
    batches = BatchIterator(images, args.batch_size, seed=args.seed)

    # The configuration is written once the inputs are checked, so a rejected run leaves no files.
    if rank == 0:
        save_config(args.out, vars(args))

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        log_every=args.log_every,
        save_every=args.save_every,
        seed=args.seed,
        amp=args.amp,
        compile=args.compile,
    )
    sidecar = {"script": "train.py", "dataset": args.dataset, "args": vars(args)}
    train_loop(model, diffusion, batches, config, args.out, sidecar, resume=args.resume)
    if rank == 0:
        print(f"done: {checkpoint_path(Path(args.out), args.steps)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
