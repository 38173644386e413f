"""Benchmark our UNet, sampler and Inception against diffusers and pytorch-fid in one run.

On one set of random weights and one batch, it measures:
- UNet forward throughput, ours eager fp32, compiled fp32 and compiled bf16 against diffusers'
  UNet2DModel eager and compiled fp32, as GFLOP/s beside a 4096x4096 matmul rate of the same run;
- the full sampler's time against the sum of its bare forwards;
- Inception feature throughput against pytorch-fid's InceptionV3 at equal precision;
- how far bf16 Inception features move FID on CIFAR-10 images.
It prints each result, the targets met and the other processes that loaded the CPU, and writes
BENCHMARKS.md.

    python bench.py                                # CIFAR-10 UNet, batches 16 and 64
    python bench.py --quick                        # smoke run, writes bench-quick.md

Timings on a shared machine are spoiled by any other load, so run it on a quiet one and read the
load lines. diffusers and pytorch-fid are test-only dependencies: pip install -r
requirements-test.txt.
"""

import argparse
import contextlib
import importlib
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import metrics
from data import load_dataset
from diffusion import Diffusion
from logs import HelpFormatter
from train import default_amp, default_compile, eps_model
from unet import PRESETS, UNet

# Settings of a full run and of a --quick smoke run; explicit flags override them.
FULL_SETTINGS = dict(
    preset="cifar10",
    batch_sizes="16,64",
    repeats=3,
    matmul_size=4096,
    sampler_steps=1000,
    sampler_batch=1,
    fid_images=1000,
)
QUICK_SETTINGS = dict(
    preset="tiny",
    batch_sizes="2",
    repeats=1,
    matmul_size=1024,
    sampler_steps=20,
    sampler_batch=1,
    fid_images=64,
)

BUSY_PERCENT = 20.0  # other processes above this share of one core are reported as load

# Targets of the speed work, checked against the in-run measurements.
MATMUL_SHARE_FP32 = 0.95  # our compiled fp32 forward, share of the fp32 matmul GFLOP/s
MATMUL_SHARE_BF16 = 0.85  # our compiled bf16 forward, share of the bf16 matmul GFLOP/s
BF16_SPEEDUP = 2.2  # our compiled bf16 forward over diffusers eager fp32
SAMPLER_OVERHEAD = 0.01  # sampler time over its bare forwards, minus one
INCEPTION_SPEEDUP = 1.5  # our Inception over pytorch-fid's, both fp32

INSTALL_HINT = "pip install -r requirements-test.txt"


# --------------------------------------------------------------------------- load on the machine


def process_table() -> dict[int, tuple[str, int, int]]:
    """Return {pid: (command name, parent pid, CPU clock ticks used)} from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while the table was read
        # The command name is in parentheses and may contain spaces, so split after it.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2 :].split()
        # rest[1] is the parent pid (field 4 of proc(5)); rest[11] and rest[12] are utime, stime.
        table[int(entry.name)] = (name, int(rest[1]), int(rest[11]) + int(rest[12]))
    return table


def command_line(pid: int, name: str) -> str:
    """Return the first 80 characters of a process's command line, else its command name."""
    try:
        words = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    text = " ".join(w.decode(errors="replace") for w in words if w)
    return text[:80] or name


def own_processes(table: dict[int, tuple[str, int, int]]) -> set[int]:
    """Return this process and its descendants, such as torch.compile's worker processes."""
    own = {os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (_, parent, _) in table.items() if parent in own}
        grew = not children <= own
        own |= children
    return own


class LoadMonitor:
    """Record which other processes used more than BUSY_PERCENT of a core during a section."""

    def __init__(self):
        self.available = Path("/proc/stat").is_file()
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.sections: list[tuple[str, list[str]]] = []

    @contextlib.contextmanager
    def section(self, name: str):
        """Measure the load of other processes while the body runs, and print it."""
        if not self.available:
            yield
            return
        before, start = process_table(), time.perf_counter()
        yield
        after, elapsed = process_table(), time.perf_counter() - start
        own = own_processes(after)
        busy = []
        for pid, (command, _, ticks) in after.items():
            if pid in own or pid not in before:
                continue
            percent = 100 * (ticks - before[pid][2]) / self.ticks_per_second / elapsed
            if percent > BUSY_PERCENT:
                busy.append(f"{command_line(pid, command)} (pid {pid}) {percent:.0f}%")
        self.sections.append((name, busy))
        print(f"  load during {name}: {', '.join(busy) if busy else 'none above 20% CPU'}")

    def summary(self) -> list[str]:
        """Return one line per section that saw other load, or one line saying there was none."""
        if not self.available:
            return ["/proc is not available, so the load of other processes was not recorded"]
        loaded = [f"{name}: {', '.join(busy)}" for name, busy in self.sections if busy]
        return loaded or ["no other process used more than 20% of a core in any section"]


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn, inputs: tuple, device: torch.device) -> float:
    """Time one call of fn(*inputs), waiting for the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn(*inputs)
    synchronize(device)
    return time.perf_counter() - start


def measure(fn, inputs: tuple, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """Time one warm-up call of fn(*inputs), which includes any compilation, then `repeats` calls.

    Returns the warm-up seconds and the list of timed seconds.
    """
    first = seconds_of(fn, inputs, device)
    return first, [seconds_of(fn, inputs, device) for _ in range(repeats)]


# --------------------------------------------------------------------------- models and weights


@contextlib.contextmanager
def stderr_silenced():
    """Drop stderr output, such as progress lines and warnings about the random weights."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def require(module: str):
    """Import a test-only package, or exit with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        sys.exit(
            f"error: bench.py compares against {module.split('.')[0]} ({error}): {INSTALL_HINT}"
        )


def randomize_weights(model: nn.Module, seed: int) -> None:
    """Draw every parameter at random, with norm scales near one, so outputs stay order one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel as a `model(x_t, t) -> eps_pred` module, for eps_model."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, return_dict=False)[0]


def build_unets(preset: str, seed: int, device: torch.device) -> tuple[UNet, nn.Module]:
    """Build our UNet with random weights and diffusers' UNet2DModel with the same weights."""
    diffusers = require("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    config = PRESETS[preset]
    ours = UNet(config).eval()
    randomize_weights(ours, seed)
    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    theirs = diffusers.UNet2DModel(**kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device), DiffusersEps(theirs).to(device)


def unet_flops_per_image(preset: str) -> float:
    """Count the FLOPs of one forward of one image, attention matmuls included.

    torch's FlopCounterMode skips the fused attention kernel of the CPU, so the count runs on the
    meta device, where scaled_dot_product_attention is counted too.
    """
    with torch.device("meta"):
        model = UNet(PRESETS[preset]).eval()
        size = model.config.sample_size
        x = torch.empty(1, model.config.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return float(counter.get_total_flops())


def random_inception_state(seed: int) -> dict[str, torch.Tensor]:
    """Random FID Inception weights that keep activations at order one through all layers.

    Convolutions get He-scaled weights and batch norms unit-order statistics, because default
    initialization shrinks the pool3 features to about 1e-8.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in metrics.FIDInceptionV3().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = tensor
        elif name.endswith("conv.weight") or name == "fc.weight":
            fan_in = tensor[0].numel()
            state[name] = torch.randn(tensor.shape, generator=generator) * (2 / fan_in) ** 0.5
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = 0.8 + 0.4 * torch.rand(tensor.shape, generator=generator)
        else:
            state[name] = 0.2 * torch.rand(tensor.shape, generator=generator) - 0.1
    return state


def official_inception_weights() -> Path | None:
    """Return pytorch-fid's Inception weights if they are on this machine, without downloading."""
    converted = metrics.converted_path(metrics.INCEPTION_SHA256)
    if converted.is_file():
        return converted
    return next((p for p in metrics.local_inception_candidates() if p.is_file()), None)


def build_inceptions(state: dict, device: torch.device, cache: Path) -> tuple[nn.Module, nn.Module]:
    """Build our Inception through load_inception and pytorch-fid's pool3 InceptionV3 from `state`.

    pytorch-fid fetches its weights with load_state_dict_from_url, so that function returns
    `state` while the network is built, and no download happens.
    """
    inception_module = require("pytorch_fid.inception")
    weights = cache / "random_inception.pth"
    torch.save(state, weights)
    with stderr_silenced():
        ours, _ = metrics.load_inception(weights, device, cache=cache)

    original = inception_module.load_state_dict_from_url
    inception_module.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        theirs = inception_module.InceptionV3([3]).eval().to(device)
    finally:
        inception_module.load_state_dict_from_url = original
    return ours, theirs


# --------------------------------------------------------------------------- measurements


@dataclass
class Row:
    """One measured variant: what ran, its timings and derived rates."""

    section: str
    batch: int
    variant: str
    seconds: list[float]
    first_call: float  # seconds of the first call, compilation included
    flops: float = 0.0  # FLOPs per call
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median

    @property
    def gflops(self) -> float:
        return self.flops / self.median / 1e9


def matmul_rates(size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Measure the GFLOP/s of a size x size matmul in fp32 and in bf16."""
    rates = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        _, seconds = measure(torch.matmul, (a, b), max(repeats, 3), device)
        rates[label] = 2 * size**3 / statistics.median(seconds) / 1e9
        print(f"matmul {size}x{size} {label}: {rates[label]:.0f} GFLOP/s")
    return rates


def output_gap(ours: UNet, theirs: nn.Module, device: torch.device) -> float:
    """Return the max absolute difference of the two UNets' fp32 outputs on one random input."""
    size = ours.config.sample_size
    x_t = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.tensor([3, 900], device=device)
    with torch.no_grad():
        return (ours(x_t, t) - theirs(x_t, t)).abs().max().item()


def unet_rows(args, ours: UNet, theirs: nn.Module, flops_per_image: float, device, monitor):
    """Time the forward of every UNet variant at every batch size."""
    size = ours.config.sample_size
    rows = []
    for batch in args.batch_size_list:
        # Each batch size compiles afresh, so no variant runs a dynamic-shape graph.
        torch.compiler.reset()
        generator = torch.Generator().manual_seed(batch)
        x_t = torch.randn(batch, 3, size, size, generator=generator).to(device)
        t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        variants = (
            ("ours eager fp32", eps_model(ours, "off", compile=False)),
            ("ours compiled fp32", eps_model(ours, "off", compile=True)),
            ("ours compiled bf16", eps_model(ours, "bf16", compile=True)),
            ("diffusers eager fp32", eps_model(theirs, "off", compile=False)),
            ("diffusers compiled fp32", eps_model(theirs, "off", compile=True)),
        )
        with monitor.section(f"UNet forwards at batch {batch}"), torch.no_grad():
            for variant, run in variants:
                first, seconds = measure(run, (x_t, t), args.repeats, device)
                row = Row("unet", batch, variant, seconds, first, flops_per_image * batch)
                rows.append(row)
                print(
                    f"UNet batch {batch} | {variant} | first call {first:.1f} s | "
                    f"{1000 * row.median:.1f} ms/forward | {row.images_per_second:.1f} img/s | "
                    f"{row.gflops:.0f} GFLOP/s"
                )
    return rows


def sampler_row(args, ours: UNet, device, monitor: LoadMonitor) -> Row:
    """Time the full ancestral sampler against the same number of bare forwards.

    The model runs with the device's default runtime settings. Runs alternate, so slow drifts in
    the machine's load hit both, and the fastest of each is kept.
    """
    amp, compile = default_amp(device), default_compile(device)
    run = eps_model(ours, amp, compile)
    diffusion = Diffusion(device=device)
    size = ours.config.sample_size
    x_T = torch.randn(args.sampler_batch, 3, size, size, device=device)
    t_batches = [
        torch.full((args.sampler_batch,), t, device=device)
        for t in diffusion.timesteps(args.sampler_steps).tolist()
    ]

    def forwards():
        for t in t_batches:
            run(x_T, t)

    def sample():
        generator = torch.Generator(device=device).manual_seed(0)
        diffusion.sample(run, x_T, steps=args.sampler_steps, generator=generator)

    bare, full = [], []
    with monitor.section("sampler"), torch.no_grad():
        first = seconds_of(run, (x_T, t_batches[0]), device)
        for _ in range(args.repeats):
            bare.append(seconds_of(forwards, (), device))
            full.append(seconds_of(sample, (), device))
    variant = f"ancestral, amp {amp}, compile {'on' if compile else 'off'}"
    overhead = min(full) / min(bare) - 1
    row = Row("sampler", args.sampler_batch, variant, full, first, extra={"bare": bare})
    row.extra["overhead"] = overhead
    print(
        f"sampler {args.sampler_steps} steps, batch {args.sampler_batch} ({variant}): "
        f"{min(full):.2f} s against {min(bare):.2f} s of bare forwards, "
        f"overhead {100 * overhead:+.2f}%"
    )
    return row


def inception_rows(args, ours: nn.Module, theirs: nn.Module, device, monitor) -> list[Row]:
    """Time our Inception (eager and compiled fp32, eager bf16) against pytorch-fid's fp32."""
    compiled = torch.compile(ours)

    def ours_run(network, amp):
        def run(images):
            with metrics.inference_precision(device, amp):
                return network(images)[0]

        return run

    rows = []
    for batch in args.batch_size_list:
        torch.compiler.reset()
        generator = torch.Generator().manual_seed(batch)
        images = torch.randint(0, 256, (batch, 3, 32, 32), generator=generator).to(device)
        images = images.float() / 255
        variants = (
            ("ours eager fp32", ours_run(ours, "off")),
            ("ours compiled fp32", ours_run(compiled, "off")),
            ("ours eager bf16", ours_run(ours, "bf16")),
            ("pytorch-fid eager fp32", lambda images: theirs(images)[0]),
        )
        with monitor.section(f"Inception at batch {batch}"), torch.no_grad():
            for variant, run in variants:
                first, seconds = measure(run, (images,), args.repeats, device)
                row = Row("inception", batch, variant, seconds, first)
                rows.append(row)
                print(
                    f"Inception batch {batch} | {variant} | first call {first:.1f} s | "
                    f"{1000 * row.median:.1f} ms/batch | {row.images_per_second:.1f} img/s"
                )
    return rows


def fid_shift(args, random_network: nn.Module, device) -> dict | None:
    """Compute FID between CIFAR-10 test and training images with fp32 and bf16 features.

    The network has pytorch-fid's weights when they are on this machine, else `random_network`.
    """
    if not args.data:
        print("FID shift skipped: pass --data or set DDPM_DATA to the data folder")
        return None
    official = official_inception_weights()
    if official is not None:
        network, _ = metrics.load_inception(official, device)
        weights = "pytorch-fid's official FID Inception weights"
    else:
        network = random_network
        weights = (
            "random Inception weights (pytorch-fid's weights are not on this machine), so the "
            "FID values themselves mean nothing"
        )
    test, _ = load_dataset("cifar10", args.data, "test")
    train, _ = load_dataset("cifar10", args.data, "train")
    count = min(args.fid_images, len(test), len(train))
    test, train = test[:count], train[:count]

    result = {"images": count, "weights": weights}
    features = {}
    for amp in ("off", "bf16"):
        with stderr_silenced():  # progress lines, and the warning about a singular covariance
            test_features, _ = metrics.inception_outputs(
                network, metrics.tensor_batches(test, 50), count, amp=amp
            )
            train_features, _ = metrics.inception_outputs(
                network, metrics.tensor_batches(train, 50), count, amp=amp
            )
            fid = metrics.frechet_distance(
                *metrics.fid_statistics(test_features), *metrics.fid_statistics(train_features)
            )
        result[amp] = fid
        features[amp] = test_features
    difference = np.linalg.norm(features["bf16"] - features["off"], axis=1)
    result["feature_error"] = float(np.median(difference / np.linalg.norm(features["off"], axis=1)))
    print(
        f"FID of {count} CIFAR-10 test against {count} training images, {weights}: "
        f"fp32 {result['off']:.3f}, bf16 {result['bf16']:.3f}, "
        f"shift {result['bf16'] - result['off']:+.3f}; median relative feature error "
        f"{result['feature_error']:.1e}"
    )
    return result


# --------------------------------------------------------------------------- report


def find_row(rows: list[Row], batch: int, variant: str) -> Row:
    return next(r for r in rows if r.batch == batch and r.variant == variant)


def target_lines(unet: list[Row], sampler: Row, inception: list[Row], rates) -> list:
    """Return (target, measured, met) for every target the run measured."""
    lines = []
    for batch in sorted({r.batch for r in unet}):
        fp32 = find_row(unet, batch, "ours compiled fp32")
        bf16 = find_row(unet, batch, "ours compiled bf16")
        eager = find_row(unet, batch, "diffusers eager fp32")
        compiled = find_row(unet, batch, "diffusers compiled fp32")
        share_fp32 = fp32.gflops / rates["fp32"]
        share_bf16 = bf16.gflops / rates["bf16"]
        lines += [
            (
                f"batch {batch}: ours compiled fp32 >= {MATMUL_SHARE_FP32:.0%} of fp32 matmul",
                f"{share_fp32:.0%}",
                share_fp32 >= MATMUL_SHARE_FP32,
            ),
            (
                f"batch {batch}: ours compiled fp32 >= diffusers eager fp32",
                f"{eager.median / fp32.median:.2f}x",
                fp32.median <= eager.median,
            ),
            (
                f"batch {batch}: ours compiled fp32 >= diffusers compiled fp32",
                f"{compiled.median / fp32.median:.2f}x",
                fp32.median <= compiled.median,
            ),
            (
                f"batch {batch}: ours compiled bf16 >= {BF16_SPEEDUP}x diffusers eager fp32",
                f"{eager.median / bf16.median:.2f}x",
                eager.median / bf16.median >= BF16_SPEEDUP,
            ),
            (
                f"batch {batch}: ours compiled bf16 >= {MATMUL_SHARE_BF16:.0%} of bf16 matmul",
                f"{share_bf16:.0%}",
                share_bf16 >= MATMUL_SHARE_BF16,
            ),
        ]
    overhead = sampler.extra["overhead"]
    lines.append(
        (
            f"sampler overhead over bare forwards <= {SAMPLER_OVERHEAD:.0%}",
            f"{overhead:+.2%}",
            overhead <= SAMPLER_OVERHEAD,
        )
    )
    for batch in sorted({r.batch for r in inception}):
        theirs = find_row(inception, batch, "pytorch-fid eager fp32")
        for variant in ("ours eager fp32", "ours compiled fp32"):
            speedup = theirs.median / find_row(inception, batch, variant).median
            lines.append(
                (
                    f"batch {batch}: Inception {variant} >= {INCEPTION_SPEEDUP}x "
                    "pytorch-fid eager fp32",
                    f"{speedup:.2f}x",
                    speedup >= INCEPTION_SPEEDUP,
                )
            )
    return lines


def machine_lines(device: torch.device) -> list[str]:
    """Describe the CPU or GPU, the thread count and the package versions."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads",
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for package in ("diffusers", "pytorch_fid", "numpy"):
        module = importlib.import_module(package)
        versions.append(f"{package.replace('_', '-')} {getattr(module, '__version__', '?')}")
    lines.append("Versions: " + ", ".join(versions))
    lines.append(f"Device: {device}")
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def header_lines(args, device, results: dict, monitor: LoadMonitor) -> list[str]:
    """Return the title, the command, the machine, the load seen and the protocol."""
    command = "python bench.py " + shlex.join(sys.argv[1:])
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Benchmarks", ""]
    if args.quick:
        lines += [
            "**Smoke run (`--quick`): small sizes on the tiny UNet, to check that bench.py runs. "
            "These are not benchmark results.**",
            "",
        ]
    return lines + [
        f"Written by `{command}` at {now}. Regenerate with the same command; "
        "`python bench.py --help` lists the settings. Every number below comes from that one run.",
        "",
        "## Machine",
        "",
        *[f"- {line}" for line in machine_lines(device)],
        "- Load from other processes (above 20% of a core, per section):",
        *[f"  - {line}" for line in monitor.summary()],
        "",
        "## Protocol",
        "",
        f"- UNet: preset `{args.preset}` with random weights (seed {args.seed}), loaded into our "
        "UNet and diffusers' UNet2DModel alike, whose fp32 outputs differ by at most "
        f"{results['gap']:.1e}; inputs x_t ~ N(0, I) and random t. "
        f"{results['flops_per_image'] / 1e9:.2f} GFLOP per image per forward, counted by "
        "torch.utils.flop_counter.FlopCounterMode with the attention matmuls.",
        "- Ours runs through `train.eps_model`, as the scripts run it; diffusers' model runs "
        "through the same wrapper, so both get the same autocast and torch.compile mode.",
        f"- Times are the median of {args.repeats} timed calls after one warm-up call; "
        '"first call" is the warm-up, compilation included. Each batch size compiles afresh.',
        f"- Matmul reference: {args.matmul_size}x{args.matmul_size} @ "
        f"{args.matmul_size}x{args.matmul_size}, 2 n^3 FLOPs per call.",
        "",
        "## Matmul reference",
        "",
        *markdown_table(
            ["dtype", "GFLOP/s"],
            [[label, f"{rate:.0f}"] for label, rate in results["matmul"].items()],
        ),
    ]


def unet_lines(unet: list[Row], rates: dict[str, float]) -> list[str]:
    """Return the UNet forward table."""
    table = []
    for row in unet:
        reference = find_row(unet, row.batch, "diffusers eager fp32")
        dtype = "bf16" if "bf16" in row.variant else "fp32"
        table.append(
            [
                str(row.batch),
                row.variant,
                f"{row.first_call:.1f}",
                f"{1000 * row.median:.1f}",
                f"{row.images_per_second:.1f}",
                f"{row.gflops:.0f}",
                f"{row.gflops / rates[dtype]:.0%} of {dtype}",
                f"{reference.median / row.median:.2f}x",
            ]
        )
    header = [
        "batch",
        "variant",
        "first call (s)",
        "ms/forward",
        "img/s",
        "GFLOP/s",
        "of matmul rate",
        "speed vs diffusers eager fp32",
    ]
    return ["## UNet forward", "", *markdown_table(header, table)]


def sampler_lines(args, sampler: Row) -> list[str]:
    """Return the sampler overhead table."""
    row = [
        f"{min(sampler.seconds):.2f}",
        f"{min(sampler.extra['bare']):.2f}",
        f"{sampler.extra['overhead']:+.2%}",
    ]
    return [
        "## Sampler overhead",
        "",
        f"Full {args.sampler_steps}-step ancestral sampler at batch {sampler.batch} "
        f"({sampler.variant}) against {args.sampler_steps} bare forwards of the same "
        f"callable and shapes; fastest of {args.repeats} alternating runs each. A negative "
        "overhead means that the sampler's own work is below the timing noise of the forwards.",
        "",
        *markdown_table(["sampler (s)", "bare forwards (s)", "overhead"], [row]),
    ]


def inception_lines(inception: list[Row]) -> list[str]:
    """Return the Inception throughput table."""
    table = []
    for row in inception:
        reference = find_row(inception, row.batch, "pytorch-fid eager fp32")
        table.append(
            [
                str(row.batch),
                row.variant,
                f"{row.first_call:.1f}",
                f"{1000 * row.median:.1f}",
                f"{row.images_per_second:.1f}",
                f"{reference.median / row.median:.2f}x",
            ]
        )
    header = ["batch", "variant", "first call (s)", "ms/batch", "img/s", "speed vs pytorch-fid"]
    return [
        "## Inception features",
        "",
        "FID Inception with random weights, identical in ours and pytorch-fid's InceptionV3 "
        "(pool3 output only), on 32x32 images in [0, 1] that both resize to 299x299. The speed "
        "column compares with pytorch-fid eager fp32.",
        "",
        *markdown_table(header, table),
    ]


def fid_lines(fid: dict | None) -> list[str]:
    """Return the FID shift of bf16 features, or why it was not measured."""
    lines = ["## FID with bf16 Inception features", ""]
    if fid is None:
        return lines + ["Not measured: no data folder (pass --data or set DDPM_DATA)."]
    return lines + [
        f"FID between the first {fid['images']} CIFAR-10 test images and the first "
        f"{fid['images']} training images, features in fp32 and in bf16 autocast, with "
        f"{fid['weights']}. FID from fewer than 2048 images is biased upward, so only the "
        "difference between the two precisions is informative.",
        "",
        *markdown_table(
            ["features", "FID", "shift from fp32", "median relative feature error"],
            [
                ["fp32", f"{fid['off']:.3f}", "", ""],
                [
                    "bf16",
                    f"{fid['bf16']:.3f}",
                    f"{fid['bf16'] - fid['off']:+.3f}",
                    f"{fid['feature_error']:.1e}",
                ],
            ],
        ),
    ]


def write_report(path: Path, args, device, results: dict, monitor: LoadMonitor) -> None:
    """Write BENCHMARKS.md: machine, versions, command, load and the result tables."""
    targets = [[name, value, "yes" if met else "no"] for name, value, met in results["targets"]]
    sections = [
        header_lines(args, device, results, monitor),
        unet_lines(results["unet"], results["matmul"]),
        sampler_lines(args, results["sampler"]),
        inception_lines(results["inception"]),
        fid_lines(results["fid"]),
        ["## Targets", "", *markdown_table(["target", "measured", "met"], targets)],
    ]
    path.write_text("\n\n".join("\n".join(lines) for lines in sections) + "\n")


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run with small sizes: {QUICK_SETTINGS}; explicit flags still override",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"UNet preset (full run: {FULL_SETTINGS['preset']})",
    )
    parser.add_argument(
        "--batch-sizes",
        help=f"comma-separated batch sizes of the UNet and Inception runs "
        f"(full run: {FULL_SETTINGS['batch_sizes']})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed calls per variant (full run: {FULL_SETTINGS['repeats']})",
    )
    parser.add_argument(
        "--matmul-size",
        type=int,
        help=f"side of the square reference matmul (full run: {FULL_SETTINGS['matmul_size']})",
    )
    parser.add_argument(
        "--sampler-steps",
        type=int,
        help=f"steps of the sampler run (full run: {FULL_SETTINGS['sampler_steps']})",
    )
    parser.add_argument(
        "--sampler-batch",
        type=int,
        help=f"images of the sampler run (full run: {FULL_SETTINGS['sampler_batch']})",
    )
    parser.add_argument(
        "--fid-images",
        type=int,
        help=f"CIFAR-10 test and training images each for the bf16 FID shift "
        f"(full run: {FULL_SETTINGS['fid_images']}; 0 skips it)",
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("DDPM_DATA"),
        help="data folder with CIFAR-10 (default: env var DDPM_DATA)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--out",
        type=Path,
        help="markdown file to write (default: BENCHMARKS.md beside bench.py for a full run, "
        "bench-quick.md in the working folder with --quick)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        repository = Path(__file__).resolve().parent
        args.out = Path("bench-quick.md") if args.quick else repository / "BENCHMARKS.md"

    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    for key, value in settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.batch_size_list = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(
            f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers"
        )
    for name in ("repeats", "matmul_size", "sampler_steps", "sampler_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if min(args.batch_size_list) < 1:
        parser.error(f"--batch-sizes {args.batch_sizes!r} must all be at least 1")
    if args.sampler_steps > Diffusion().T:
        parser.error(f"--sampler-steps {args.sampler_steps} exceeds T = {Diffusion().T}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    require("diffusers")
    require("pytorch_fid")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    monitor = LoadMonitor()
    print(f"bench.py on {device}, {torch.get_num_threads()} threads")

    flops_per_image = unet_flops_per_image(args.preset)
    results = {"flops_per_image": flops_per_image}
    with monitor.section("matmul reference"):
        results["matmul"] = matmul_rates(args.matmul_size, args.repeats, device)
    ours, theirs = build_unets(args.preset, args.seed, device)
    results["gap"] = output_gap(ours, theirs, device)
    print(
        f"UNet {args.preset}: {flops_per_image / 1e9:.2f} GFLOP per image per forward; ours and "
        f"diffusers differ by at most {results['gap']:.1e} on the same weights and input"
    )
    results["unet"] = unet_rows(args, ours, theirs, flops_per_image, device, monitor)
    results["sampler"] = sampler_row(args, ours, device, monitor)
    with tempfile.TemporaryDirectory() as folder:
        state = random_inception_state(args.seed)
        ours_inception, theirs_inception = build_inceptions(state, device, Path(folder))
    results["inception"] = inception_rows(args, ours_inception, theirs_inception, device, monitor)
    with monitor.section("FID shift"):
        results["fid"] = fid_shift(args, ours_inception, device) if args.fid_images else None
    results["targets"] = target_lines(
        results["unet"], results["sampler"], results["inception"], results["matmul"]
    )

    print("\ntargets:")
    for name, value, met in results["targets"]:
        print(f"  {'met    ' if met else 'not met'} | {name} | {value}")
    print("load from other processes:")
    for line in monitor.summary():
        print(f"  {line}")
    write_report(args.out, args, device, results, monitor)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
