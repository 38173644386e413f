"""Robustness fine-tuning: continue training a pretrained DDPM on corrupted images, then measure it.

The intervention of "Post-Training Strains Diffusion Models: A Stability Analysis of Distillation,
Robustness, and Unlearning" (Bharadwaj, Liu and Zheng), Section 4.2 and Appendices B and D. Training
continues from the base model with the unchanged L_simple objective, schedule and architecture,
and only x_0 changes. Each training image is corrupted before the forward process q(x_t | x_0): it
stays clean with probability 0.2, otherwise it gets one of Gaussian noise, defocus blur, fog and
JPEG compression, chosen uniformly, at severity 3 (corruptions.py, Appendix D.3). Checkpoints are
kept at 500 / 1000 / 1500 / 2000 steps for CIFAR-10 and 50 / 100 / 150 / 200 for CelebA-HQ.

    python robust.py --dataset cifar10 --data $DDPM_DATA

A CPU demo scales the steps down to 5 / 10 / 15 / 20 and evaluates a few images without FID. It
needs a base model of the tiny preset (`python train.py --preset tiny ...`), and its numbers are
not comparable with the study's:

    python robust.py --dataset cifar10 --data $DDPM_DATA --base TINY.safetensors \
        --steps-scale 0.01 --batch-size 32 --nll-images 8 --robust-images 8 \
        --eval-batch-size 8 --fid-samples 0 --out runs/robust-tiny

The base model and every checkpoint are measured by FID and IS of their samples and by the NLL of
clean held-out images, in the layout of the study's Tables 3-5. A robustness table adds the NLL
and L_simple of corrupted held-out images, one column per corruption.

The study reports CIFAR-10 FID 265.73 / 294.54 / 312.08 / 324.54 and IS 1.493 / 1.325 / 1.284 /
1.249 after 500 / 1000 / 1500 / 2000 steps (Tables 3 and 5). Its sample budget was small, because
its base model scores FID 134.95 where Ho et al. 2020 (arXiv 2006.11239) report 3.17 on 50,000
samples. Its NLL figures (Table 4) are not in bits/dim. Results go to <out>/results.md and
results.json, with corruption_grid.png beside them.
"""

import argparse
import math
from pathlib import Path

import torch
import torch.distributed as dist

import metrics
from checkpoint import atomic_write, load_model, write_json
from corruptions import (
    CLEAN,
    CLEAN_PROBABILITY,
    FAMILIES,
    PROTOCOL_SEVERITY,
    apply_corruption,
    corrupt_model_range,
    save_corruption_grid,
)
from data import BatchIterator, check_data_folder, load_dataset, to_model_range
from diffusion import SAMPLERS, Diffusion
from logs import HelpFormatter, log_event, save_config, warn
from train import PAPER_SETTINGS as TRAIN_SETTINGS
from train import (
    TrainConfig,
    add_runtime_args,
    checkpoint_path,
    resolve_runtime,
    set_dropout,
    setup_distributed,
    train_loop,
)
from unet import pretrained_path

# Per-dataset settings. The checkpoint steps are the study's (Tables 3-5). The study gives no
# optimizer settings for this intervention, so lr, batch size and dropout are those of the original
# training (Ho et al. 2020, Appendix B, as in train.py), without warmup because training continues
# from a converged model. The evaluation budgets are this script's choices: sample counts and
# sampler follow metrics.py, and `robust_images` keeps the robustness table affordable, because
# it costs one NLL per corruption and model.
PAPER_SETTINGS = {
    "cifar10": dict(
        checkpoint_steps=(500, 1000, 1500, 2000),
        lr=TRAIN_SETTINGS["cifar10"]["lr"],
        batch_size=TRAIN_SETTINGS["cifar10"]["batch_size"],
        dropout=TRAIN_SETTINGS["cifar10"]["dropout"],
        nll_images=1000,
        robust_images=500,
        fid_samples=metrics.DATASET_DEFAULTS["cifar10"]["fid_samples"],
        eval_batch_size=metrics.DATASET_DEFAULTS["cifar10"]["sample_batch_size"],
    ),
    "celebahq": dict(
        checkpoint_steps=(50, 100, 150, 200),
        lr=TRAIN_SETTINGS["celebahq"]["lr"],
        batch_size=TRAIN_SETTINGS["celebahq"]["batch_size"],
        dropout=TRAIN_SETTINGS["celebahq"]["dropout"],
        nll_images=200,
        robust_images=50,
        fid_samples=metrics.DATASET_DEFAULTS["celebahq"]["fid_samples"],
        eval_batch_size=metrics.DATASET_DEFAULTS["celebahq"]["sample_batch_size"],
    ),
}
DATASET_NAMES = {"cifar10": "CIFAR-10", "celebahq": "CelebA-HQ"}
BASE_LABEL = "base"


# ---------------------------------------------------------------- settings


def parse_step_list(text: str) -> tuple[int, ...]:
    """Parse "5,10,15,20" into increasing positive step counts."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"invalid step list {text!r}: use comma-separated integers such as 5,10,15,20"
        ) from error
    if not steps or steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise argparse.ArgumentTypeError(
            f"invalid step list {text!r}: the steps must be positive and increasing"
        )
    return steps


def scaled_steps(steps: tuple[int, ...], scale: float) -> tuple[int, ...]:
    """Multiply checkpoint steps by `scale`, rounding, for CPU demos of the paper's schedule."""
    scaled = tuple(max(1, round(step * scale)) for step in steps)
    if len(set(scaled)) != len(scaled):
        raise ValueError(
            f"--steps-scale {scale} maps the steps {list(steps)} to {list(scaled)}, which repeat. "
            "Use a larger scale or pass --checkpoint-steps"
        )
    return scaled


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def denoising_loss(
    model: torch.nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    batch_size: int,
    seed: int,
    draws: int,
) -> dict:
    """Compute L_simple of uint8 images (N, 3, H, W), averaged over `draws` (t, eps) per image.

    t and eps come from a generator seeded with `seed`, so two calls on image sets of the same
    shape and batch size use identical t and eps. Models and corruptions are thus compared on the
    same draws. Returns the mean and sample std over images and the counts.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    per_image = []
    for batch in images.split(batch_size):
        x_0 = to_model_range(batch).to(device)
        total = torch.zeros(len(batch), dtype=torch.float64)
        for _ in range(draws):
            t = torch.randint(0, diffusion.T, (len(batch),), generator=generator, device=device)
            eps = torch.randn(x_0.shape, generator=generator, device=device)
            total += diffusion.training_loss(model, x_0, t, eps).double().cpu()
        per_image.append(total / draws)
    losses = torch.cat(per_image)
    return {
        "loss_mean": float(losses.mean()),
        "loss_std": float(losses.std()) if len(losses) > 1 else float("nan"),
        "n_images": len(losses),
        "draws": draws,
    }


def corrupted_sets(
    images: torch.Tensor, family: str, severity: int, seed: int
) -> dict[str, torch.Tensor]:
    """Return the clean uint8 images and each corruption of `family` applied to them, as uint8.

    Corrupted images are rounded to 8 bits because the NLL's decoder term is defined on the 8-bit
    pixel grid, as CIFAR-10-C stores its images. Each corruption draws from its own generator
    seeded with `seed`, so every model is evaluated on the same corrupted images.
    """
    x = images.float() / 255
    sets = {CLEAN: images}
    for name in FAMILIES[family].operators:
        generator = torch.Generator().manual_seed(seed)
        corrupted = apply_corruption(x, name, severity, generator, family)
        sets[name] = (corrupted * 255).round().clamp(0, 255).to(torch.uint8)
    return sets


def fid_settings(args, model, step: int) -> dict:
    """Return the sampling settings of one model's FID samples, the same to draw and to measure."""
    return dict(
        dataset=args.dataset,
        steps=args.sample_steps,
        sampler=args.sampler,
        n_samples=args.fid_samples,
        seed=args.seed,
        out_dir=Path(args.out) / f"fid_step{step:07d}",
        batch_size=args.eval_batch_size,
        image_size=model.config.sample_size,
    )


def draw_fid_samples(args, models: list[tuple[str, int, Path]], diffusion) -> None:
    """Draw the FID samples of every model; under torchrun each process draws its share."""
    if args.fid_samples == 0:
        return
    for _, step, path in models:
        model, _ = load_model(path, weights=args.eval_weights, device=args.device)
        metrics.draw_fid_samples(model, diffusion, **fid_settings(args, model, step))


def sample_quality(args, model, diffusion, step: int) -> dict:
    """Return FID and IS of the model's samples from metrics.evaluate, or why they are missing."""
    return metrics.evaluate(
        model,
        diffusion,
        data_root=args.data,
        inception=args.inception,
        **fid_settings(args, model, step),
    )


def evaluate_model(args, label, step, path, diffusion, test_images, robust_sets) -> dict:
    """Measure one model: FID, IS and NLL on clean images, then NLL and L_simple per corruption."""
    model, _ = load_model(path, weights=args.eval_weights, device=args.device)
    model.eval()
    clean_nll = metrics.nll_statistics(
        model, diffusion, test_images, args.eval_batch_size, seed=args.seed
    )
    quality = sample_quality(args, model, diffusion, step)

    # The clean column repeats the clean NLL when both use the same images, seed and batches.
    robustness = {}
    for name, images in robust_sets.items():
        if name == CLEAN and torch.equal(images, test_images):
            nll = clean_nll
        else:
            nll = metrics.nll_statistics(
                model, diffusion, images, args.eval_batch_size, seed=args.seed
            )
        robustness[name] = {
            "nll": nll,
            "loss": denoising_loss(
                model, diffusion, images, args.eval_batch_size, args.seed, args.loss_draws
            ),
        }

    result = {
        "label": label,
        "step": step,
        "checkpoint": str(path),
        "weights": args.eval_weights,
        "nll": clean_nll,
        "quality": quality,
        "robustness": robustness,
    }
    scores = (
        "FID and IS not computed"
        if quality["fid"] is None
        else f"FID {quality['fid']:.2f} | IS {quality['is_mean']:.2f} ± {quality['is_std']:.2f}"
    )
    per_corruption = " | ".join(
        f"{name} {entry['nll']['bpd_mean']:.4f} bits/dim, loss {entry['loss']['loss_mean']:.4f}"
        for name, entry in robustness.items()
    )
    log_event(
        args.out,
        f"eval step {step} ({label}) | nll {clean_nll['bpd_mean']:.4f} bits/dim "
        f"({clean_nll['n_images']} images) | {scores} | {per_corruption}",
        {"event": "eval", **result},
    )
    return result


# ---------------------------------------------------------------- report


def format_mean_std(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "—"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric_table(title: str, dataset_label: str, results: list[dict], cell) -> list[str]:
    """Return a markdown table with one row for the dataset and one column per model."""
    header = " | ".join(r["label"] for r in results)
    cells = " | ".join(cell(r) for r in results)
    return [
        f"### {title}",
        "",
        "Columns: fine-tuning steps, with the base model before fine-tuning first.",
        "",
        f"| Dataset | {header} |",
        "| --- |" + " --- |" * len(results),
        f"| {dataset_label} | {cells} |",
        "",
    ]


def robustness_table(title: str, results: list[dict], cell) -> list[str]:
    """Return a markdown table with one row per model and one column per image set."""
    names = list(results[0]["robustness"])
    lines = [
        f"### {title}",
        "",
        "| Fine-tuning steps | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for r in results:
        cells = " | ".join(cell(r["robustness"][name]) for name in names)
        lines.append(f"| {r['label']} | {cells} |")
    return [*lines, ""]


def write_report(args, results: list[dict]) -> None:
    """Write results.json and results.md: the study's Tables 3-5 and the robustness tables."""
    write_json(Path(args.out) / "results.json", {"args": vars(args), "results": results})
    dataset_label = DATASET_NAMES[args.dataset]

    def fid(r):
        return format_mean_std(r["quality"]["fid"], None, 2)

    def nll(r):
        bpd = format_mean_std(r["nll"]["bpd_mean"], r["nll"]["bpd_std"], 4)
        nats = format_mean_std(r["nll"]["nats_mean"], r["nll"]["nats_std"], 1)
        return f"{bpd} bits/dim ({nats} nats/image)"

    def inception_score(r):
        return format_mean_std(r["quality"]["is_mean"], r["quality"]["is_std"], 3)

    lines = [f"# Robustness fine-tuning, {dataset_label}", ""]
    lines += metric_table(
        "FID after robustness fine-tuning (lower is better)", dataset_label, results, fid
    )
    lines += metric_table(
        "NLL of clean held-out images (lower is better)", dataset_label, results, nll
    )
    lines += metric_table(
        "Inception Score (higher is better)", dataset_label, results, inception_score
    )
    lines += robustness_table(
        f"NLL in bits/dim of corrupted held-out images ({args.corruptions} family, "
        f"severity {args.severity})",
        results,
        lambda entry: format_mean_std(entry["nll"]["bpd_mean"], entry["nll"]["bpd_std"], 4),
    )
    lines += robustness_table(
        f"L_simple of corrupted held-out images ({args.corruptions} family, "
        f"severity {args.severity})",
        results,
        lambda entry: format_mean_std(entry["loss"]["loss_mean"], entry["loss"]["loss_std"], 5),
    )

    # Protocol: what every number above was measured on.
    first = results[0]
    quality = first["quality"]
    if quality["fid"] is None:
        quality_protocol = f"FID and IS not computed: {quality['not_computed']}."
    else:
        quality_protocol = f"FID and IS: {metrics.format_protocol(quality)}."
    robust_count = first["robustness"][CLEAN]["nll"]["n_images"]
    lines += [
        "Protocol:",
        "",
        f"- Models: the base model {args.base} and the fine-tuned checkpoints, "
        f"{args.eval_weights} weights.",
        f"- Fine-tuning: corruptions of the {args.corruptions} family at severity "
        f"{args.severity}, images clean with probability {args.clean_probability}; lr {args.lr}, "
        f"batch {args.batch_size}, dropout {args.dropout}, seed {args.seed}.",
        f"- {quality_protocol}",
        f"- NLL: DDPM variational bound on the first {first['nll']['n_images']} held-out "
        f"{args.dataset} test images, mean ± std over images, noise seed {args.seed}.",
        f"- Robustness: the first {robust_count} test images, corrupted once with seed "
        f"{args.seed} and rounded to 8 bits. L_simple averages {args.loss_draws} (t, eps) draws "
        f"per image, the same draws for every model and column (seed {args.seed}).",
        "",
        "![corruption grid](corruption_grid.png)",
        "",
    ]
    text = "\n".join(lines)
    atomic_write(Path(args.out) / "results.md", lambda tmp: tmp.write_text(text))
    print(text)


# ---------------------------------------------------------------- script


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--dataset", choices=sorted(PAPER_SETTINGS), default="cifar10", help="dataset and settings"
    )
    parser.add_argument("--data", help="dataset folder (CIFAR-10 is downloaded when omitted)")
    parser.add_argument("--base", help="base model file (default: google's, fetched)")
    parser.add_argument("--cache-dir", help="download cache (default: $DDPM_CACHE)")
    parser.add_argument("--out", help="output folder (default: runs/robust-<dataset>)")
    parser.add_argument(
        "--corruptions",
        choices=sorted(FAMILIES),
        default="proxy",
        help="corruption family: the study's proxies or the CIFAR-10-C operators",
    )
    parser.add_argument(
        "--severity",
        type=int,
        default=PROTOCOL_SEVERITY,
        help="corruption severity: 3 for the proxies, 1-5 for cifar10c",
    )
    parser.add_argument(
        "--clean-probability",
        type=float,
        default=CLEAN_PROBABILITY,
        help="probability that a training image stays clean",
    )
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument(
        "--checkpoint-steps",
        type=parse_step_list,
        help="fine-tuning steps to checkpoint and evaluate, e.g. 5,10,15,20",
    )
    steps.add_argument(
        "--steps-scale",
        type=float,
        help="multiply the paper's checkpoint steps by this factor (e.g. 0.01 for a CPU demo)",
    )
    parser.add_argument("--batch-size", type=int, help="global training batch size")
    parser.add_argument("--lr", type=float, help="AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=0, help="linear learning-rate warmup steps")
    parser.add_argument("--dropout", type=float, help="UNet dropout probability during training")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    parser.add_argument(
        "--eval-weights",
        choices=["ema", "model"],
        default="ema",
        help="weights of each checkpoint to evaluate: the EMA or the live model",
    )
    parser.add_argument("--nll-images", type=int, help="clean held-out images for the NLL")
    parser.add_argument(
        "--robust-images", type=int, help="held-out images per corruption for the robustness table"
    )
    parser.add_argument(
        "--loss-draws", type=int, default=10, help="(t, eps) draws per image for L_simple"
    )
    parser.add_argument("--fid-samples", type=int, help="samples for FID and IS (0: skip)")
    parser.add_argument("--sample-steps", type=int, default=1000, help="sampling steps for FID")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ancestral", help="FID sampler")
    parser.add_argument("--inception", help="Inception weights (.pth or converted .safetensors)")
    parser.add_argument("--eval-batch-size", type=int, help="batch size of sampling and NLL")
    parser.add_argument("--grid-images", type=int, default=8, help="images in the corruption grid")
    parser.add_argument("--log-every", type=int, default=50, help="steps per log line")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, noise and evaluation")
    add_runtime_args(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue from --out's latest checkpoint"
    )
    args = parser.parse_args(argv)

    # Paper settings fill every option left unset.
    settings = PAPER_SETTINGS[args.dataset]
    for key, value in settings.items():
        if key != "checkpoint_steps" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.checkpoint_steps is None:
        scale = 1.0 if args.steps_scale is None else args.steps_scale
        if scale <= 0:
            parser.error(f"--steps-scale {scale} must be positive")
        try:
            args.checkpoint_steps = scaled_steps(settings["checkpoint_steps"], scale)
        except ValueError as error:
            parser.error(str(error))
    if args.severity not in FAMILIES[args.corruptions].severities:
        parser.error(
            f"--severity {args.severity} is not defined for the {args.corruptions} family; "
            f"use one of {list(FAMILIES[args.corruptions].severities)}"
        )
    for name in ("nll_images", "robust_images", "loss_draws", "eval_batch_size", "grid_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.fid_samples < 0:
        parser.error(f"--fid-samples {args.fid_samples} must be 0 (skip) or positive")
    args.out = args.out or f"runs/robust-{args.dataset}"
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_runtime(args)

    # Reject a run that would overwrite the checkpoints of an earlier one.
    out_dir = Path(args.out)
    existing = sorted(out_dir.glob("ckpt_*.safetensors"))
    if existing and not args.resume:
        raise SystemExit(
            f"error: {args.out} already contains checkpoints ({existing[-1].name}). Pass --resume "
            "to continue that run, or choose a new --out"
        )
    check_data_folder(args.dataset, args.data)  # before the base model's download
    args.base = str(Path(args.base) if args.base else pretrained_path(args.dataset, args.cache_dir))
    rank, _ = setup_distributed(device)

    # The model to fine-tune, with the training dropout, and its diffusion settings.
    model, diffusion_config = load_model(args.base, weights="ema", device=device)
    set_dropout(model, args.dropout)
    diffusion = Diffusion(diffusion_config, device)
    image_size = model.config.sample_size

    # Data: training images, held-out test images and their corrupted copies.
    train_images, _ = load_dataset(args.dataset, args.data, "train", size=image_size)
    test_images, _ = load_dataset(args.dataset, args.data, "test", size=image_size)
    for name in ("nll_images", "robust_images"):
        if getattr(args, name) > len(test_images):
            warn(
                f"--{name.replace('_', '-')} {getattr(args, name)} exceeds the "
                f"{len(test_images)} test images; using all of them"
            )
    robust_sets = corrupted_sets(
        test_images[: args.robust_images], args.corruptions, args.severity, args.seed
    )
    batches = BatchIterator(train_images, args.batch_size, seed=args.seed)

    # Files are written once the inputs are checked, so a rejected run leaves none.
    if rank == 0:
        save_config(args.out, vars(args))
        grid_generator = torch.Generator().manual_seed(args.seed)
        save_corruption_grid(
            test_images[: args.grid_images].float() / 255,
            out_dir / "corruption_grid.png",
            grid_generator,
            family=args.corruptions,
        )

    # Fine-tune with the shared loop. Each batch is corrupted before the forward process.
    def corrupt(x_0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        corrupted, _ = corrupt_model_range(
            x_0, generator, args.corruptions, args.severity, args.clean_probability
        )
        return corrupted

    config = TrainConfig(
        steps=args.checkpoint_steps[-1],
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        log_every=args.log_every,
        save_every=0,
        checkpoint_steps=args.checkpoint_steps,
        seed=args.seed,
        amp=args.amp,
        compile=args.compile,
    )
    sidecar = {"script": "robust.py", "dataset": args.dataset, "args": vars(args)}
    train_loop(
        model, diffusion, batches, config, args.out, sidecar, augment=corrupt, resume=args.resume
    )
    del model

    # Under torchrun every process trains and draws its share of every model's FID samples.
    # Only then does the first one evaluate, so no process waits on its NLL work.
    models = [(BASE_LABEL, 0, Path(args.base))]
    models += [(str(s), s, checkpoint_path(out_dir, s)) for s in args.checkpoint_steps]
    draw_fid_samples(args, models, diffusion)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank != 0:
        return []

    # Evaluate the base model, then every checkpoint, and rewrite the report after each.
    nll_images = test_images[: args.nll_images]
    results = []
    for label, step, path in models:
        results.append(evaluate_model(args, label, step, path, diffusion, nll_images, robust_sets))
        write_report(args, results)
    return results


if __name__ == "__main__":
    main()
