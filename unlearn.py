"""Unlearn a forget set from a pretrained DDPM with the SISS objective without importance sampling.

"SISS (No IS)" of Alberti et al. 2025, "Data Unlearning in Diffusion Models", arXiv 2503.01034, in
the form of eq. 5 of "Post-Training Strains Diffusion Models: A Stability Analysis of Distillation,
Robustness, and Unlearning" (Appendix C). The UNet is fine-tuned on paired minibatches from the
keep set and the forget set with

    L = L_simple(x_keep) - lambda * L_simple(x_forget),

where both terms use the same timesteps t and the same noise eps, and the noise schedule stays
fixed. `--forget-grad-norm S` replaces the fixed lambda by the practice of the official SISS code:
each step the forget-term gradient is rescaled to norm S before it is subtracted. The forget set
is a CIFAR-10 class (airplane by default) or a CelebA-HQ attribute (Smiling by default).

    python unlearn.py --dataset cifar10 --data DATA_DIR

The study reports forget-set NLL 48,346 -> 71,546 (x1.48, its Table 7) and FID 134.79 -> 208.27
(its Table 6) for CIFAR-10 airplanes, from a small sample budget. Results go to <out>/results.md
and results.json: forget-set and keep-set NLL (bits/dim and nats/image), FID and IS before and
after, PNG sample grids from the same noise, and one Pareto row per unlearning strength.
"""

import argparse
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.utils import save_image

import metrics
from checkpoint import load_model, write_json
from data import DEFAULT_FORGET, BatchIterator, check_data_folder, load_dataset, split_keep_forget
from diffusion import SAMPLERS, Diffusion
from logs import HelpFormatter, log_event, save_config, warn
from train import (
    TrainConfig,
    add_runtime_args,
    checkpoint_path,
    eps_model,
    latest_checkpoint,
    resolve_runtime,
    set_dropout,
    setup_distributed,
    train_loop,
)
from unet import pretrained_path

# ---------------------------------------------------------------------------- settings

# The study keeps lambda fixed per experiment but gives neither its value nor the optimizer. The
# optimizer follows the official SISS code (github.com/claserken/SISS, config/delete_cifar.yaml
# and config/delete_celeb.yaml): AdamW with betas (0.95, 0.999) and weight decay 1e-6, gradient
# clipping at 1.0 and no EMA; lr 1e-5 for 300 steps at batch 128 on CIFAR-10, and lr 5e-6 for
# 60 steps at batch 64 (4 x 16 accumulated there) on CelebA-HQ. Dropout is that of the original
# trainings (Ho et al. 2020): 0.1 on CIFAR-10, none on CelebA-HQ.
#
# The official CelebA-HQ run rescaled the forget gradient to norm s = 500, but its losses sum the
# squared error over the 3 x 256 x 256 = 196,608 values of an image, where L_simple here takes
# their mean. The same run is therefore `--forget-grad-norm 0.00254` (500 / 196,608) here.
# NOTE: lambda = 1 is a guess that weighs both terms of eq. 5 equally; the study does not say.
PAPER_SETTINGS = {
    "cifar10": dict(
        forget=DEFAULT_FORGET["cifar10"],
        lam=1.0,
        lr=1e-5,
        steps=300,
        batch_size=128,
        dropout=0.1,
        save_every=50,
        nll_images=256,
        grid_images=64,
    ),
    "celebahq": dict(
        forget=DEFAULT_FORGET["celebahq"],
        lam=1.0,
        lr=5e-6,
        steps=60,
        batch_size=64,
        dropout=0.0,
        save_every=20,
        nll_images=32,
        grid_images=16,
    ),
}
ADAM_BETAS = (0.95, 0.999)
WEIGHT_DECAY = 1e-6

# Arguments that a finished or interrupted run must share with the current one to be reused.
RUN_SETTINGS = (
    "base",
    "dataset",
    "forget",
    "lr",
    "steps",
    "batch_size",
    "dropout",
    "grad_clip",
    "seed",
)


@dataclass
class Strength:
    """One unlearning strength: a fixed lambda, or a forget-gradient norm S."""

    mode: str  # "lambda" or "forget_grad_norm"
    value: float

    @property
    def label(self) -> str:
        name = "lambda" if self.mode == "lambda" else "forget-grad-norm"
        return f"{name} {self.value:g}"

    @property
    def folder(self) -> str:
        return f"{self.mode}_{self.value:g}"


# ---------------------------------------------------------------------------- objective


def paired_losses(diffusion, model, x_keep, x_forget, t, eps):
    """Return the mean L_simple of the keep batch and of the forget batch under the same t and eps.

    Both batches go through the network in one forward pass. GroupNorm and attention act on
    each image alone, so this equals two separate passes up to float rounding.
    """
    x_0 = torch.cat([x_keep, x_forget])
    losses = diffusion.training_loss(model, x_0, torch.cat([t, t]), torch.cat([eps, eps]))
    loss_keep, loss_forget = losses.split([len(x_keep), len(x_forget)])
    return loss_keep.mean(), loss_forget.mean()


def siss_step(diffusion: Diffusion, lam: float):
    """Build the train_loop step for L = L_simple(x_keep) - lam * L_simple(x_forget)."""

    def step(model, x_keep, x_forget, t, eps):
        loss_keep, loss_forget = paired_losses(diffusion, model, x_keep, x_forget, t, eps)
        return loss_keep - lam * loss_forget

    return step


def split_losses_step(diffusion: Diffusion):
    """Build the train_loop step that returns (L_keep, L_forget) for a custom backward pass."""

    def step(model, x_keep, x_forget, t, eps):
        return paired_losses(diffusion, model, x_keep, x_forget, t, eps)

    return step


def forget_grad_norm_backward(norm: float):
    """Build the backward pass g = g_keep - (norm / ||g_forget||) * g_forget of the SISS code.

    ||g_forget|| is the global L2 norm over all parameters. The returned loss for the log is
    L_keep - (norm / ||g_forget||) * L_forget, the objective whose gradient is g.
    """

    def backward(model, losses):
        loss_keep, loss_forget = losses
        parameters = [p for p in model.parameters() if p.requires_grad]
        grads_forget = torch.autograd.grad(loss_forget, parameters, retain_graph=True)
        loss_keep.backward()

        # DistributedDataParallel averages only what backward() computes, so g_forget by hand.
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads_forget])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            chunks = flat.split([g.numel() for g in grads_forget])
            grads_forget = [c.view_as(g) for c, g in zip(chunks, grads_forget, strict=True)]
        forget_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads_forget])
        )
        scale = norm / forget_norm
        for p, g_forget in zip(parameters, grads_forget, strict=True):
            p.grad.sub_(scale * g_forget)
        return (loss_keep - scale * loss_forget).detach()

    return backward


class PairedBatches:
    """Endless pairs (keep batch, forget batch) of equal size, resumable like BatchIterator."""

    def __init__(self, keep: torch.Tensor, forget: torch.Tensor, batch_size: int, seed: int):
        self.keep = BatchIterator(keep, batch_size, seed=seed)
        # A different seed, so that the two sets are not shuffled in step.
        self.forget = BatchIterator(forget, batch_size, seed=seed + 1)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.keep), next(self.forget)

    def state_dict(self) -> dict:
        return {"keep": self.keep.state_dict(), "forget": self.forget.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.keep.load_state_dict(state["keep"])
        self.forget.load_state_dict(state["forget"])


# ---------------------------------------------------------------------------- evaluation


def fid_settings(args, out_dir: Path, name: str) -> dict:
    """Return the sampling settings of one model's FID samples, the same to draw and to measure."""
    return dict(
        dataset=args.dataset,
        steps=args.sample_steps,
        sampler=args.sampler,
        n_samples=args.fid_samples,
        seed=args.seed,
        out_dir=out_dir / f"fid_{name}",
        batch_size=args.eval_batch_size,
        image_size=args.image_size,
    )


def draw_fid_samples(args, base, diffusion, out_dir: Path) -> None:
    """Draw the FID samples of the base model and of each strength's final checkpoint.

    Under torchrun each process draws its share of the shards.
    """
    if args.fid_samples == 0:
        return
    metrics.draw_fid_samples(base, diffusion, **fid_settings(args, out_dir, "before"))
    for strength in args.strengths:
        run_dir = out_dir / strength.folder
        path = checkpoint_path(run_dir, args.steps)
        model, _ = load_model(path, weights="model", device=args.device)
        metrics.draw_fid_samples(model, diffusion, **fid_settings(args, run_dir, "after"))


def evaluate_model(args, model, diffusion, nll_sets, noise, name, out_dir) -> dict:
    """Measure forget-set and keep-set NLL, FID and IS of one model and save its sample grid."""
    model.eval()
    result = {}

    # Variational-bound NLL in float32, with the same q(x_t | x_0) noise for every model.
    for set_name, images in nll_sets.items():
        result[f"{set_name}_nll"] = metrics.nll_statistics(
            model, diffusion, images, args.eval_batch_size, seed=args.seed
        )

    # Sample grid from the fixed noise x_T and a freshly seeded ancestral noise generator.
    generator = torch.Generator(noise.device).manual_seed(args.seed)
    eps_fn = eps_model(model, args.amp, compile=False)
    samples = diffusion.sample(
        eps_fn, noise, steps=args.sample_steps, sampler=args.sampler, generator=generator
    )
    grid = out_dir / f"samples_{name}.png"
    save_image((samples + 1) / 2, grid, nrow=int(math.sqrt(len(samples))) or 1)
    result["grid"] = str(grid)

    # FID and IS against the training set.
    result["quality"] = metrics.evaluate(
        model,
        diffusion,
        data_root=args.data,
        inception=args.inception,
        **fid_settings(args, out_dir, name),
    )

    forget, keep = result["forget_nll"], result["keep_nll"]
    log_event(
        out_dir,
        f"eval {name} | forget nll {forget['bpd_mean']:.4f} bits/dim ({forget['n_images']} "
        f"images) | keep nll {keep['bpd_mean']:.4f} bits/dim ({keep['n_images']} images) | "
        f"{metrics.format_protocol(result['quality'])}",
        {"event": "eval", "model": name, **result},
    )
    return result


def format_nll(nll: dict, unit: str) -> str:
    """Format NLL mean ± std in bits/dim ("bpd") or nats/image ("nats"); one image has no std."""
    digits = 4 if unit == "bpd" else 1
    mean, std = nll[f"{unit}_mean"], nll[f"{unit}_std"]
    if math.isnan(std):
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}"


def nll_change(before: dict, after: dict, unit: str = "bpd") -> tuple[float, float]:
    """Return the increase of the mean NLL and the after/before ratio."""
    first, last = before[f"{unit}_mean"], after[f"{unit}_mean"]
    return last - first, last / first


def fid_change(before: dict, after: dict) -> str:
    before_fid, after_fid = before["quality"], after["quality"]
    if before_fid is None or after_fid is None or None in (before_fid["fid"], after_fid["fid"]):
        return "n/a"
    return f"{after_fid['fid'] - before_fid['fid']:+.2f}"


def nll_table(set_name: str, before: dict, runs: list[dict]) -> list[str]:
    """Return markdown rows of one set's NLL before and after, in the layout of Table 7."""
    key = f"{set_name}_nll"
    lines = [
        f"| strength | {set_name} NLL before (bits/dim) | after (bits/dim) | Δ (bits/dim) | "
        "after/before | before (nats/image) | after (nats/image) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        increase, ratio = nll_change(before[key], run["after"][key])
        lines.append(
            f"| {run['strength']} | {format_nll(before[key], 'bpd')} | "
            f"{format_nll(run['after'][key], 'bpd')} | {increase:+.4f} | {ratio:.3f} | "
            f"{format_nll(before[key], 'nats')} | {format_nll(run['after'][key], 'nats')} |"
        )
    return lines


def write_report(args, before: dict, runs: list[dict], out_dir: Path) -> str:
    """Write results.json and results.md with the layouts of the study's Tables 6-7."""
    write_json(
        out_dir / "results.json", {"args": args_record(args), "before": before, "runs": runs}
    )

    # Table 6 layout: sample quality before and after.
    quality = [
        "| strength | FID before | FID after | Δ FID | IS before | IS after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        after = run["after"]
        quality.append(
            f"| {run['strength']} | {metrics.format_fid(before['quality'])} | "
            f"{metrics.format_fid(after['quality'])} | {fid_change(before, after)} | "
            f"{metrics.format_is(before['quality'])} | {metrics.format_is(after['quality'])} |"
        )

    # Pareto table: what each strength costs and gains.
    pareto = [
        "| strength | forget-NLL increase (bits/dim) | keep-NLL increase (bits/dim) | FID after |",
        "| --- | --- | --- | --- |",
    ]
    for run in runs:
        forget_increase, forget_ratio = nll_change(before["forget_nll"], run["after"]["forget_nll"])
        keep_increase, keep_ratio = nll_change(before["keep_nll"], run["after"]["keep_nll"])
        pareto.append(
            f"| {run['strength']} | {forget_increase:+.4f} ({100 * (forget_ratio - 1):+.1f}%) | "
            f"{keep_increase:+.4f} ({100 * (keep_ratio - 1):+.1f}%) | "
            f"{metrics.format_fid(run['after']['quality'])} |"
        )

    nll_images = before["forget_nll"]["n_images"], before["keep_nll"]["n_images"]
    protocol = (
        f"Protocol: forget set `{args.forget}` of {args.dataset} at {args.image_size}x"
        f"{args.image_size}; NLL = DDPM variational bound (T = {args.T}) on the first "
        f"{nll_images[0]} forget and {nll_images[1]} keep images of the {args.nll_split} split, "
        f"noise seed {args.seed}; {args.steps} steps of batch {args.batch_size} pairs, AdamW lr "
        f"{args.lr:g}; sample grids: {args.sampler} {args.sample_steps} steps from the same noise "
        f"(seed {args.seed}); {metrics.format_protocol(before['quality'])}"
    )
    grids = [f"![before]({Path(before['grid']).relative_to(out_dir)})"]
    grids += [f"![{r['strength']}]({Path(r['after']['grid']).relative_to(out_dir)})" for r in runs]
    text = "\n".join(
        [
            f"# Unlearning `{args.forget}` from {args.dataset}",
            "",
            "## Sample quality (layout of Table 6)",
            "",
            *quality,
            "",
            "## Forget-set NLL (layout of Table 7)",
            "",
            *nll_table("forget", before, runs),
            "",
            "## Keep-set NLL",
            "",
            *nll_table("keep", before, runs),
            "",
            "## Pareto: forgetting against utility",
            "",
            *pareto,
            "",
            protocol,
            "",
            *grids,
            "",
        ]
    )
    (out_dir / "results.md").write_text(text)
    print(text)
    return text


# ---------------------------------------------------------------------------- unlearning


def unlearn(args, base, diffusion, keep, forget, strength: Strength, out_dir: Path):
    """Fine-tune a copy of `base` with one unlearning strength and return the unlearned UNet.

    A finished run in `out_dir` is reused. A non-finite loss or gradient norm stops the run
    with the step and the value, and the checkpoints written before it stay as they are.
    """
    final = checkpoint_path(out_dir, args.steps)
    latest = latest_checkpoint(out_dir) if args.resume else None
    if final.is_file():
        log_event(
            out_dir if not dist.is_initialized() or dist.get_rank() == 0 else None,
            f"{strength.label}: reusing {final}",
            {"event": "reuse", "path": str(final)},
        )
        model, _ = load_model(final, weights="model", device=args.device)
        return model

    model = copy.deepcopy(base).train().requires_grad_(True)
    set_dropout(model, args.dropout)
    if strength.mode == "lambda":
        step_fn, backward_fn = siss_step(diffusion, strength.value), None
    else:
        step_fn = split_losses_step(diffusion)
        backward_fn = forget_grad_norm_backward(strength.value)

    # ema_decay 0 makes the EMA copy equal the model after every step: SISS uses no EMA.
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=WEIGHT_DECAY,
        adam_betas=ADAM_BETAS,
        grad_clip=args.grad_clip,
        ema_decay=0.0,
        log_every=args.log_every,
        save_every=args.save_every,
        seed=args.seed,
        amp=args.amp,
        compile=args.compile,
    )
    sidecar = {
        "script": "unlearn.py",
        "dataset": args.dataset,
        "forget": args.forget,
        "mode": strength.mode,
        "strength": strength.value,
        "base": args.base,
        "args": args_record(args),
    }
    batches = PairedBatches(keep, forget, args.batch_size, args.seed)
    model, _ = train_loop(
        model,
        diffusion,
        batches,
        config,
        out_dir,
        sidecar,
        step_fn=step_fn,
        backward_fn=backward_fn,
        resume=latest is not None,
    )
    return model


def check_run_folder(args, out_dir: Path) -> None:
    """Raise ValueError when a checkpoint that unlearn() reuses or resumes has other settings."""
    candidates = [checkpoint_path(out_dir, args.steps)]
    if args.resume:
        candidates.append(latest_checkpoint(out_dir))
    current = args_record(args)
    for checkpoint in candidates:
        if checkpoint is None or not checkpoint.is_file():
            continue
        saved = json.loads(checkpoint.with_suffix(".json").read_text())["args"]
        for key in RUN_SETTINGS:
            if saved.get(key) != current[key]:
                raise ValueError(
                    f"{checkpoint} was trained with {key}={saved.get(key)!r}, but this run has "
                    f"{key}={current[key]!r}; pass another --out or delete {out_dir}"
                )


def args_record(args) -> dict:
    """Return the arguments as JSON values: paths as strings, strengths as labels."""
    record = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    record["strengths"] = [strength.label for strength in args.strengths]
    return record


def first_images(images: torch.Tensor, count: int, description: str) -> torch.Tensor:
    """Return the first `count` images, with a warning when there are fewer."""
    if len(images) < count:
        warn(f"only {len(images)} {description} images for the NLL, fewer than {count}")
    return images[:count]


def run(args) -> list[dict]:
    """Unlearn with every strength, then evaluate the base model and each result, and report.

    Under torchrun every process trains and draws its share of the FID samples, and only the
    first one evaluates and writes the report.
    """
    rank, _ = setup_distributed(torch.device(args.device))
    out_dir = args.out
    base, diffusion_config = load_model(args.base, weights="ema", device=args.device)
    args.image_size = base.config.sample_size
    args.T = diffusion_config.T

    # Keep and forget sets of the training split, and the NLL sets of --nll-split.
    images, masks = load_dataset(args.dataset, args.data, "train", size=args.image_size)
    keep, forget = split_keep_forget(images, masks, args.forget)
    if rank == 0:
        print(f"data: keep set {len(keep):,} images, forget set `{args.forget}` {len(forget):,}")
    if args.nll_split != "train":
        images, masks = load_dataset(args.dataset, args.data, args.nll_split, size=args.image_size)
    nll_keep, nll_forget = split_keep_forget(images, masks, args.forget)
    nll_sets = {
        "forget": first_images(nll_forget, args.nll_images, f"{args.nll_split} forget-set"),
        "keep": first_images(nll_keep, args.nll_images, f"{args.nll_split} keep-set"),
    }

    # Inputs and the settings of runs to reuse or resume are checked before any file is written.
    for strength in args.strengths:
        check_run_folder(args, out_dir / strength.folder)
    if rank == 0:
        save_config(out_dir, vars(args))
    diffusion = Diffusion(diffusion_config, args.device)

    # Every process trains each strength; a finished run is reused.
    for strength in args.strengths:
        unlearn(args, base, diffusion, keep, forget, strength, out_dir / strength.folder)

    # Every process draws its share of the FID samples before the first one evaluates, so no
    # process waits on its NLL work.
    draw_fid_samples(args, base, diffusion, out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank != 0:
        return []

    # The same noise x_T for every sample grid.
    generator = torch.Generator(args.device).manual_seed(args.seed)
    shape = (args.grid_images, 3, args.image_size, args.image_size)
    noise = torch.randn(shape, generator=generator, device=args.device)

    # The base model, then the final checkpoint of every strength.
    before = evaluate_model(args, base, diffusion, nll_sets, noise, "before", out_dir)
    runs = []
    for strength in args.strengths:
        run_dir = out_dir / strength.folder
        path = checkpoint_path(run_dir, args.steps)
        model, _ = load_model(path, weights="model", device=args.device)
        after = evaluate_model(args, model, diffusion, nll_sets, noise, "after", run_dir)
        runs.append(
            {
                "strength": strength.label,
                "mode": strength.mode,
                "value": strength.value,
                "checkpoint": str(path),
                "after": after,
            }
        )
        del model
    write_report(args, before, runs, out_dir)
    return runs


# ---------------------------------------------------------------------------- command line


def parse_values(text: str) -> list[float]:
    """Parse a comma-separated list of numbers such as 0.1,0.3,1."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list {text!r}; use numbers like 0.1,0.3,1"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}; give at least one number")
    return values


def resolve_strengths(parser, args) -> list[Strength]:
    """Collect the strengths to run from --lambda(s) and --forget-grad-norm(s)."""
    lambdas = args.lambdas or ([args.lam] if args.lam is not None else [])
    norms = args.forget_grad_norms or (
        [args.forget_grad_norm] if args.forget_grad_norm is not None else []
    )
    if lambdas and norms:
        parser.error("pass either --lambda/--lambdas or --forget-grad-norm(s), not both")
    if norms:
        if any(not (math.isfinite(s) and s > 0) for s in norms):
            parser.error(f"forget-gradient norms {norms} must be positive and finite")
        return [Strength("forget_grad_norm", s) for s in norms]
    lambdas = lambdas or [PAPER_SETTINGS[args.dataset]["lam"]]
    if any(not (math.isfinite(lam) and lam >= 0) for lam in lambdas):
        parser.error(f"lambda values {lambdas} must be non-negative and finite")
    return [Strength("lambda", lam) for lam in lambdas]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(PAPER_SETTINGS), default="cifar10")
    parser.add_argument("--data", help="dataset folder (CIFAR-10 is downloaded when omitted)")
    parser.add_argument("--base", help="model file to unlearn from (default: google's, fetched)")
    parser.add_argument("--cache-dir", help="download cache (default: $DDPM_CACHE)")
    parser.add_argument("--out", help="output folder (default: runs/unlearn-<dataset>)")
    parser.add_argument(
        "--forget", help="class (CIFAR-10) or attribute (CelebA-HQ) of the forget set"
    )
    parser.add_argument(
        "--lambda", dest="lam", type=float, help="weight of the forget term (default per dataset)"
    )
    parser.add_argument(
        "--lambdas", type=parse_values, help="comma-separated lambdas, one run each"
    )
    parser.add_argument(
        "--forget-grad-norm",
        type=float,
        help="rescale the forget-term gradient to this L2 norm each step instead of using "
        "lambda; the gradient is that of L_simple, a mean over pixels",
    )
    parser.add_argument(
        "--forget-grad-norms",
        type=parse_values,
        help="comma-separated forget-gradient norms, one run each",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per strength")
    parser.add_argument("--batch-size", type=int, help="keep/forget pairs per step")
    parser.add_argument("--lr", type=float, help="AdamW learning rate")
    parser.add_argument("--dropout", type=float, help="UNet dropout probability while unlearning")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--save-every", type=int, help="steps per rolling checkpoint")
    parser.add_argument("--log-every", type=int, default=10, help="steps per log line")
    parser.add_argument(
        "--nll-split",
        choices=["train", "test"],
        default="train",
        help="split whose forget and keep images the NLL is measured on",
    )
    parser.add_argument("--nll-images", type=int, help="images per set for the NLL")
    parser.add_argument("--fid-samples", type=int, help="samples for FID and IS (0: skip)")
    parser.add_argument("--inception", help="Inception weights (.pth or converted)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="sampler of grids and FID samples")
    parser.add_argument("--sample-steps", type=int, help="sampling steps of grids and FID samples")
    parser.add_argument("--grid-images", type=int, help="samples in each PNG grid")
    parser.add_argument(
        "--eval-batch-size", type=int, default=64, help="images per batch for NLL and sampling"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and noise")
    add_runtime_args(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue unfinished runs from their checkpoints"
    )
    args = parser.parse_args(argv)

    # Per-dataset settings fill what the flags leave open.
    for key, value in PAPER_SETTINGS[args.dataset].items():
        if key != "lam" and getattr(args, key) is None:
            setattr(args, key, value)
    evaluation = metrics.DATASET_DEFAULTS[args.dataset]
    args.fid_samples = evaluation["fid_samples"] if args.fid_samples is None else args.fid_samples
    args.sampler = args.sampler or evaluation["sampler"]
    args.sample_steps = args.sample_steps or evaluation["steps"]
    args.strengths = resolve_strengths(parser, args)
    args.out = Path(args.out or f"runs/unlearn-{args.dataset}")
    return args


def main(argv=None):
    args = parse_args(argv)
    resolve_runtime(args)
    check_data_folder(args.dataset, args.data)  # before the base model's download
    args.base = str(args.base or pretrained_path(args.dataset, args.cache_dir))
    run(args)


if __name__ == "__main__":
    main()
