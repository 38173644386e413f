"""Progressive distillation of a DDPM sampler, 1000 -> 500 -> 250 steps, by trajectory matching.

The objective of Appendix A of "Post-Training Strains Diffusion Models: A Stability Analysis of
Distillation, Robustness, and Unlearning" (Bharadwaj, Liu and Zheng; "the study" below), after
SFD (Zhou et al. 2024, "Simple and Fast Distillation of Diffusion Models", arXiv 2409.19681).
From shared noise the teacher runs its deterministic DDIM trajectory (Song et al. 2021,
arXiv 2010.02502) without gradient, and the student, initialised from the teacher, takes one
DDIM step for every two teacher steps. Each student step starts from the student's own previous
state, detached, and is trained on the L1 distance to the teacher's state at the same timestep.
The loss is the study's eq. 1, the sum of those distances over the trajectory, so by default a
trajectory gives one AdamW update (`--steps-per-update K` updates every K student steps
instead), with gradient clipping at 1.0 and an EMA. Stage 1 distills the 1000-step base model
into a 500-step student; stage 2 distills that student into a 250-step one.

    python distill.py --dataset cifar10 --stage 2

Every --save-every trajectories a stage saves a checkpoint to <out>/stage<k>/, and --resume
continues a killed stage from it. `torchrun --nproc_per_node N distill.py ...` splits each
trajectory batch and the FID samples across N processes; the first process alone measures the
models and writes the report.

The study reports CIFAR-10 FID 134.95 / 134.27 / 133.57 at 1000 / 500 / 250 steps (its Table 1)
from a small sample budget; the same base checkpoint scores FID 3.17 on 50,000 samples
(Ho et al. 2020, arXiv 2006.11239, Table 1). Results go to <out>/results.json and results.md.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.utils import save_image

import metrics
from checkpoint import (
    load_model,
    load_training_state,
    save_model,
    save_training_state,
    write_json,
)
from data import check_data_folder, load_dataset
from diffusion import Diffusion
from logs import HelpFormatter, log_event, save_config
from train import (
    add_runtime_args,
    autocast,
    check_same_architecture,
    checkpoint_path,
    eps_model,
    latest_checkpoint,
    resolve_runtime,
    setup_distributed,
    step_seed,
)
from unet import pretrained_path

# Per-dataset settings. The study gives the stage structure, AdamW, clipping at 1.0 and an EMA
# (Appendix A.3) but no learning rate, batch size or length: lr 5e-5 and batch 128 are SFD's
# CIFAR-10 settings. `trajectories` counts teacher trajectories, that is optimizer updates.
# NOTE: the trajectory counts are this project's choice. A stage-1 trajectory costs about 2,500
# forward equivalents per image (1,000 teacher forwards, 500 student forwards and backwards), so
# at an assumed 100 TFLOP/s stage 1 takes an estimated 3 GPU-hours on CIFAR-10 (12.1 GFLOP per
# forward) and 5.5 on CelebA-HQ (496 GFLOP per forward); these are estimates, not measurements.
# NOTE: lr 5e-5 is SFD's for students with a few steps. At 500 and 250 steps the undistilled
# teacher is already within L1 0.002 of its 1000-step samples, and in the tiny CPU run of
# RESULTS.md 30 Adam updates at this lr moved the student away from the teacher instead.
PAPER_SETTINGS = {
    "cifar10": dict(
        batch_size=128,
        trajectories=300,
        lr=5e-5,
        ema_decay=0.999,
        nll_images=1000,
        fid_samples=50_000,
        grid_images=64,
        l1_images=256,
    ),
    "celebahq": dict(
        batch_size=8,
        trajectories=200,
        lr=5e-5,
        ema_decay=0.999,
        nll_images=200,
        fid_samples=10_000,
        grid_images=16,
        l1_images=32,
    ),
}
BASE_STEPS = 1000


# ---------------------------------------------------------------- trajectories


def ddim_pair_targets(diffusion, teacher, x_T, teacher_steps, amp):
    """Yield the teacher's DDIM state after every second step, from noise x_T, without gradient.

    With trailing spacing the student's timesteps are every second teacher timestep, so the n-th
    yielded state is the teacher's x at the student's n-th target timestep.
    """
    timesteps = diffusion.timesteps(teacher_steps).tolist()
    x_t = x_T
    t_batch = torch.empty(x_T.shape[0], dtype=torch.long, device=x_T.device)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        # no_grad must not span the yield, or it would leak into the caller's student step.
        with torch.no_grad(), autocast(amp, x_T.device):
            eps_pred = teacher(x_t, t_batch.fill_(t)).float()
            x_t = diffusion.ddim_step(x_t, t, t_prev, eps_pred)
        if i % 2 == 1:
            yield x_t


def resume_stage(stage_dir: Path, student, ema, optimizer, device, rank: int) -> int:
    """Load student, EMA, optimizer and RNG states from the stage's latest checkpoint.

    Returns the number of trajectories already trained, 0 when there is no checkpoint.
    """
    path = latest_checkpoint(stage_dir)
    if path is None:
        return 0
    saved, _ = load_model(path, weights="model", device=device)
    check_same_architecture(path, saved, student)
    student.load_state_dict(saved.state_dict())
    saved_ema, _ = load_model(path, weights="ema", device=device)
    ema.load_state_dict(saved_ema.state_dict())
    extra = load_training_state(path.with_suffix(".train.safetensors"), optimizer)
    log_event(
        stage_dir.parent if rank == 0 else None,
        f"resumed from {path} at trajectory {extra['trajectory']}",
        {"event": "resume", "path": str(path), "trajectory": extra["trajectory"]},
    )
    return extra["trajectory"]


def save_stage(stage_dir: Path, trajectory: int, student, ema, optimizer, diffusion, args):
    """Save a resumable checkpoint of the stage after `trajectory`, then drop the previous one."""
    previous = latest_checkpoint(stage_dir)
    path = checkpoint_path(stage_dir, trajectory)
    sidecar = {"script": "distill.py", "trajectory": trajectory, "args": vars(args)}
    save_model(path, student, diffusion.config, ema=ema, sidecar=sidecar)
    save_training_state(
        path.with_suffix(".train.safetensors"), optimizer, {"trajectory": trajectory}
    )
    if previous is not None and previous != path:
        for suffix in (".safetensors", ".json", ".train.safetensors"):
            previous.with_suffix(suffix).unlink(missing_ok=True)


def distill_stage(args, stage, teacher, diffusion, out_dir, device):
    """Train a student with half the teacher's steps; return the student and its EMA.

    Every --save-every trajectories the student, its EMA, the optimizer and the RNG states go to
    <out>/stage<k>/ckpt_<trajectory>.safetensors, and --resume continues from the latest one.
    Under torchrun each process runs rows rank, rank + world, ... of every trajectory batch, and
    DistributedDataParallel averages the gradients, so the update equals a single process's.
    """
    rank, world = setup_distributed(device)
    if args.batch_size % world:
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by {world} processes; "
            "choose a multiple of the process count"
        )
    teacher_steps = BASE_STEPS // 2 ** (stage - 1)
    student_steps = teacher_steps // 2
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher).eval().requires_grad_(False)
    teacher = teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    stage_dir = out_dir / f"stage{stage}"
    start = resume_stage(stage_dir, student, ema, optimizer, device, rank) if args.resume else 0
    if start > args.trajectories:
        raise ValueError(
            f"{stage_dir} has a checkpoint at trajectory {start}, beyond --trajectories "
            f"{args.trajectories}; raise --trajectories or choose a new --out"
        )
    student_net = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    student_net = torch.compile(student_net) if args.compile else student_net
    timesteps = diffusion.timesteps(student_steps).tolist()
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    group = args.steps_per_update or student_steps
    updates_per_trajectory = math.ceil(student_steps / group)

    for trajectory in range(start + 1, args.trajectories + 1):
        # The global batch of noise from this trajectory's seed, and this process's rows.
        begin = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(step_seed(args.seed, trajectory))
        x_T = torch.randn(shape, device=device, generator=generator)[rank::world]
        x_student = x_T
        t_batch = torch.empty(x_T.shape[0], dtype=torch.long, device=device)
        losses = []
        targets = ddim_pair_targets(diffusion, teacher, x_T, teacher_steps, args.amp)
        optimizer.zero_grad(set_to_none=True)
        for i, (t, x_teacher) in enumerate(zip(timesteps, targets, strict=True)):
            # One student step from its own detached state, matched to the teacher's state.
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            with autocast(args.amp, device):
                eps_pred = student_net(x_student, t_batch.fill_(t)).float()
            x_next = diffusion.ddim_step(x_student, t, t_prev, eps_pred)
            loss = F.l1_loss(x_next, x_teacher)

            # Eq. 1 sums the L1 over the steps; because every step starts from a detached
            # state, accumulating per-step gradients gives the gradient of a group's mean.
            group_start = i - i % group
            group_size = min(group, student_steps - group_start)
            (loss / group_size).backward()
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss)
                loss = loss / world
            loss_value = loss.item()
            losses.append(loss_value)
            x_student = x_next.detach()
            last_in_group = i + 1 == group_start + group_size

            # One update per group of student steps, guarded against divergence.
            grad_norm = torch.tensor(0.0)
            if last_in_group:
                grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm.item())):
                last_good = latest_checkpoint(stage_dir) or "none yet"
                raise FloatingPointError(
                    f"stage {stage} diverged at trajectory {trajectory}, student step {i}: "
                    f"L1 {loss_value}, gradient norm {grad_norm.item()}; the last good "
                    f"checkpoint is {last_good}. Lower --lr and resume from it"
                )
            if not last_in_group:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update = (trajectory - 1) * updates_per_trajectory + (i // group) + 1
            decay = min(args.ema_decay, (1 + update) / (10 + update))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), student.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)

        elapsed = time.perf_counter() - begin
        if rank == 0 and (trajectory % args.log_every == 0 or trajectory == args.trajectories):
            mean_l1 = sum(losses) / len(losses)
            log_event(
                out_dir,
                f"stage {stage} trajectory {trajectory}/{args.trajectories} | "
                f"l1 {mean_l1:.4f} | final l1 {losses[-1]:.4f} | {elapsed:.1f} s/trajectory",
                {"stage": stage, "trajectory": trajectory, "l1": mean_l1, "final_l1": losses[-1]},
            )
        if rank == 0 and args.save_every and trajectory % args.save_every == 0:
            save_stage(stage_dir, trajectory, student, ema, optimizer, diffusion, args)
    return student, ema


# ---------------------------------------------------------------- evaluation


def fixed_noise(args, count, device):
    """Draw the evaluation noise, the same for every model and stage."""
    generator = torch.Generator(device=device).manual_seed(args.seed + 10_000)
    shape = (count, 3, args.image_size, args.image_size)
    return torch.randn(shape, device=device, generator=generator)


def ddim_samples(diffusion, model, noise, steps, args):
    """DDIM (eta = 0) samples in [-1, 1], in batches of --batch-size."""
    run = eps_model(model, args.amp, args.compile)
    chunks = [
        diffusion.sample(run, chunk, steps=steps, sampler="ddim")
        for chunk in noise.split(args.batch_size)
    ]
    return torch.cat(chunks)


def fid_settings(args, stage: int, steps: int, out_dir: Path) -> dict:
    """Return the sampling settings of one stage's FID samples, the same to draw and to measure."""
    return dict(
        dataset=args.dataset,
        steps=steps,
        sampler="ddim",
        n_samples=args.fid_samples,
        seed=args.seed,
        out_dir=out_dir / f"fid_stage{stage}",
        batch_size=args.batch_size,
        image_size=args.image_size,
    )


def draw_fid_samples(args, models: list, diffusion, out_dir: Path) -> None:
    """Draw the FID samples of the base model (stage 0) and of each stage's student.

    Under torchrun each process draws its share of the shards.
    """
    if args.fid_samples == 0:
        return
    for stage, model in enumerate(models):
        run = eps_model(model, args.amp, args.compile)
        settings = fid_settings(args, stage, BASE_STEPS // 2**stage, out_dir)
        metrics.draw_fid_samples(run, diffusion, **settings)


def evaluate_stage(args, stage, model, diffusion, steps, test_images, reference, out_dir, device):
    """NLL, FID/IS, the sample grid and the L1 distances of one model at `steps` steps."""
    noise = fixed_noise(args, args.l1_images, device)
    samples = ddim_samples(diffusion, model, noise, steps, args)
    grid_path = out_dir / f"samples_stage{stage}_{steps}steps.png"
    save_image((samples[: args.grid_images] + 1) / 2, grid_path, nrow=8)

    run = eps_model(model, args.amp, args.compile)
    nll = metrics.nll_statistics(run, diffusion, test_images, args.batch_size, seed=args.seed)
    quality = metrics.evaluate(
        run,
        diffusion,
        data_root=args.data,
        inception=args.inception,
        **fid_settings(args, stage, steps, out_dir),
    )
    result = {
        "stage": stage,
        "steps": steps,
        "nll": nll,
        "quality": quality,
        "l1_to_base_1000": (samples - reference).abs().mean().item(),
        "grid": grid_path.name,
    }
    log_event(
        out_dir,
        f"eval stage {stage} | {steps} steps | nll {nll['bpd_mean']:.4f} bits/dim "
        f"({nll['n_images']} images) | L1 to base 1000-step {result['l1_to_base_1000']:.4f} "
        f"({args.l1_images} samples) | {metrics.format_protocol(quality)}",
        {"event": "eval", **result},
    )
    return result


def write_report(results, args, out_dir):
    """Write results.json and a markdown table shaped like the study's Tables 1-2."""
    write_json(out_dir / "results.json", {"args": vars(args), "results": results})
    lines = [
        "| stage | steps | NLL (bits/dim) | NLL (nats/image) | FID | IS | L1 to base 1000-step "
        "| L1 of undistilled base at same steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        nll, quality = r["nll"], r["quality"]
        control = r.get("control_l1")
        lines.append(
            f"| {r['stage']} | {r['steps']} | {nll['bpd_mean']:.4f} ± {nll['bpd_std']:.4f} | "
            f"{nll['nats_mean']:.1f} ± {nll['nats_std']:.1f} | {metrics.format_fid(quality)} | "
            f"{metrics.format_is(quality)} | {r['l1_to_base_1000']:.4f} | "
            f"{'—' if control is None else f'{control:.4f}'} |"
        )
    protocol = (
        f"Protocol: DDIM (eta 0) sampling at each stage's steps; NLL = DDPM variational bound on "
        f"{results[0]['nll']['n_images']} held-out {args.dataset} test images (seed {args.seed}); "
        f"L1 = mean absolute difference in [-1, 1] over {args.l1_images} samples from the same "
        f"noise (seed {args.seed + 10_000}); {metrics.format_protocol(results[0]['quality'])}"
    )
    grids = [f"![stage {r['stage']}]({r['grid']})" for r in results]
    text = "\n".join(["# Progressive distillation", "", *lines, "", protocol, "", *grids, ""])
    (out_dir / "results.md").write_text(text)
    print(text)


# ---------------------------------------------------------------- script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(PAPER_SETTINGS), default="cifar10")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=2, help="last stage to run")
    parser.add_argument("--teacher", help="base model file (default: google's, fetched)")
    parser.add_argument("--data", help="dataset folder (CIFAR-10 is downloaded when omitted)")
    parser.add_argument("--out", help="output folder (default: runs/distill-<dataset>)")
    parser.add_argument("--cache-dir", help="download cache (default: $DDPM_CACHE)")
    parser.add_argument("--image-size", type=int, help="sample size (default: the model's)")
    parser.add_argument("--batch-size", type=int, help="noise images per teacher trajectory")
    parser.add_argument("--trajectories", type=int, help="teacher trajectories per stage")
    parser.add_argument("--lr", type=float, help="AdamW learning rate")
    parser.add_argument(
        "--steps-per-update",
        type=int,
        default=0,
        help="student steps per optimizer update (0: one update per trajectory, as in eq. 1)",
    )
    parser.add_argument("--ema-decay", type=float, help="EMA decay per update")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--nll-images", type=int, help="held-out images for the NLL")
    parser.add_argument("--fid-samples", type=int, help="samples for FID and IS (0: skip)")
    parser.add_argument("--inception", help="Inception weights (.pth or converted)")
    parser.add_argument("--grid-images", type=int, help="samples in the PNG grid")
    parser.add_argument("--l1-images", type=int, help="samples for the L1 comparison")
    parser.add_argument("--log-every", type=int, default=1, help="trajectories per log line")
    parser.add_argument(
        "--save-every", type=int, default=10, help="trajectories per resumable checkpoint (0: none)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue unfinished stages from their checkpoints"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of noise and evaluation")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    for key, value in PAPER_SETTINGS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "trajectories", "nll_images", "l1_images", "grid_images"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} {getattr(args, key)} must be at least 1")
    for key in ("fid_samples", "steps_per_update", "save_every"):
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} {getattr(args, key)} must be 0 or more")
    args.out = args.out or f"runs/distill-{args.dataset}"
    return args


def check_stage_folders(args, out_dir: Path) -> None:
    """Raise ValueError when an unfinished stage has checkpoints but --resume is not set."""
    for stage in range(1, args.stage + 1):
        existing = sorted((out_dir / f"stage{stage}").glob("ckpt_*.safetensors"))
        if existing and not args.resume and not (out_dir / f"stage{stage}.safetensors").is_file():
            raise ValueError(
                f"{out_dir / f'stage{stage}'} contains the checkpoint {existing[-1].name} of an "
                "unfinished run; pass --resume to continue it, or choose a new --out"
            )


def train_stages(args, base, diffusion, out_dir: Path, device) -> list:
    """Train or reuse each stage's student, taught by the previous stage's; return their EMAs."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    students, teacher = [], base
    for stage in range(1, args.stage + 1):
        student_path = out_dir / f"stage{stage}.safetensors"
        if student_path.is_file():
            log_event(
                out_dir if rank == 0 else None,
                f"stage {stage}: reusing {student_path}",
                {"event": "reuse", "stage": stage, "path": str(student_path)},
            )
            student, _ = load_model(student_path, weights="ema", device=device)
        else:
            if stage < args.stage:
                log_event(
                    out_dir if rank == 0 else None,
                    f"stage {stage} student missing: training it first",
                    {"event": "train_missing_stage", "stage": stage},
                )
            live, student = distill_stage(args, stage, teacher, diffusion, out_dir, device)
            if rank == 0:
                save_model(
                    student_path,
                    live,
                    diffusion.config,
                    ema=student,
                    sidecar={
                        "script": "distill.py",
                        "stage": stage,
                        "steps": BASE_STEPS // 2**stage,
                        "dataset": args.dataset,
                        "args": vars(args),
                        "teacher": args.teacher,
                    },
                )

                # The stage's resumable checkpoints are obsolete once its student file exists.
                for path in (out_dir / f"stage{stage}").glob("ckpt_*"):
                    path.unlink()
        students.append(student)
        teacher = student
    return students


def main(argv=None):
    args = parse_args(argv)
    device = resolve_runtime(args)
    rank, _ = setup_distributed(device)
    out_dir = Path(args.out)
    check_data_folder(args.dataset, args.data)  # before the teacher's download
    teacher_path = (
        Path(args.teacher) if args.teacher else pretrained_path(args.dataset, args.cache_dir)
    )
    args.teacher = str(teacher_path)

    # Inputs are checked before the configuration is written, so a rejected run leaves no files.
    base, diffusion_config = load_model(teacher_path, weights="ema", device=device)
    args.image_size = args.image_size or base.config.sample_size
    test_images, _ = load_dataset(args.dataset, args.data, "test", size=args.image_size)
    test_images = test_images[: args.nll_images]
    check_stage_folders(args, out_dir)
    if rank == 0:
        save_config(out_dir, vars(args))
    diffusion = Diffusion(diffusion_config, device)

    # Every process trains. Under torchrun every process then loads the students that the first
    # one saved, so that all draw their share of the FID samples from the same weights.
    students = train_stages(args, base, diffusion, out_dir, device)
    if dist.is_initialized():
        dist.barrier()
        students = [
            load_model(out_dir / f"stage{stage}.safetensors", weights="ema", device=device)[0]
            for stage in range(1, args.stage + 1)
        ]

    # Dropout stays off while evaluating: a model loaded from a file is in training mode, and
    # eps_model hides the module from the samplers, which therefore cannot switch it.
    for model in (base, *students):
        model.eval()

    # The first process evaluates only once every sample is drawn, so no process waits on its
    # NLL work.
    draw_fid_samples(args, [base, *students], diffusion, out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank != 0:
        return []

    # Stage 0 is the base model itself; the stages after it are students.
    noise = fixed_noise(args, args.l1_images, device)
    reference = ddim_samples(diffusion, base, noise, BASE_STEPS, args)
    results = [
        evaluate_stage(
            args, 0, base, diffusion, BASE_STEPS, test_images, reference, out_dir, device
        )
    ]
    for stage, student in enumerate(students, start=1):
        steps = BASE_STEPS // 2**stage
        result = evaluate_stage(
            args, stage, student, diffusion, steps, test_images, reference, out_dir, device
        )

        # Control: the undistilled base model run with the student's step count.
        control = ddim_samples(diffusion, base, noise, steps, args)
        result["control_l1"] = (control - reference).abs().mean().item()
        results.append(result)
    write_report(results, args, out_dir)
    return results


if __name__ == "__main__":
    main()
