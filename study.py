"""Run the whole study on one dataset and write its report.

    python study.py --dataset cifar10                                  # paper settings, a GPU job
    python study.py --dataset cifar10 --preset cpu-tiny --data DIR     # tiny model, two CPU cores
    python study.py --dataset cifar10 --preset cpu-tiny --data DIR \\
        --base runs/study-cifar10-cpu-tiny/distill-<key>/stage2.safetensors --interventions unlearn

The study has parts: the base model (trained here by the cpu-tiny preset, google's checkpoint
otherwise), then progressive distillation, robustness fine-tuning and unlearning, each started
from the base. Each part runs one script (train.py, distill.py, robust.py, unlearn.py) in its own
folder `<out>/<part>-<key>`, where the key hashes the script, its arguments and the sha256 of
its base model. So a rerun reuses every finished part, resumes an unfinished one, and runs a part
whose settings or base changed in a new folder, leaving the old one untouched.

`--base CHECKPOINT` starts the chosen interventions from any model file instead, for example a
distilled student or a robustness checkpoint of this study. These are compositions of
interventions; the report shows them in their own table beside the same intervention run on the
study's base. After every part, `<out>/report.md` is rewritten from the parts' results.json files.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import distill
import report
import robust
import train
import unlearn
from checkpoint import write_json
from data import check_data_folder
from logs import HelpFormatter, log_event
from metrics import file_sha256
from train import checkpoint_path
from unet import pretrained_path

INTERVENTIONS = ("distill", "robust", "unlearn")

# Each part's script and the flag that names its starting model.
SCRIPTS = {
    "train": train.main,
    "distill": distill.main,
    "robust": robust.main,
    "unlearn": unlearn.main,
}
BASE_FLAG = {"distill": "--teacher", "robust": "--base", "unlearn": "--base"}

# Arguments of each part per preset. Options left out take the script's paper settings.
# The unlearning part of the study also sweeps lambda; compositions run the default lambda only.
PRESETS = {
    "paper": {
        "train": None,
        "distill": [],
        "robust": [],
        "unlearn": [],
        "lambdas": "0.1,0.3,1",
    },
    "cpu-tiny": {
        # 400 steps of the tiny UNet at 32x32, the size of its samples for both datasets.
        "train": [
            "--preset", "tiny", "--image-size", "32", "--steps", "400", "--batch-size", "16",
            "--lr", "1e-3", "--warmup", "50", "--dropout", "0", "--ema-decay", "0.999",
            "--save-every", "200", "--log-every", "50",
        ],
        "distill": [
            "--trajectories", "2", "--batch-size", "2", "--nll-images", "2",
            "--l1-images", "4", "--grid-images", "4", "--fid-samples", "10",
        ],
        "robust": [
            "--checkpoint-steps", "25,50", "--batch-size", "16", "--nll-images", "2",
            "--robust-images", "2", "--fid-samples", "10", "--sample-steps", "100",
            "--eval-batch-size", "10", "--grid-images", "4", "--log-every", "25",
        ],
        "unlearn": [
            "--steps", "40", "--batch-size", "16", "--nll-images", "2", "--fid-samples", "10",
            "--sample-steps", "100", "--grid-images", "4", "--eval-batch-size", "10",
            "--save-every", "20",
        ],
        "lambdas": "0.3,1",
    },
}  # fmt: skip

STUDY_FILE = "study.json"
PART_FILE = "part.json"


def part_key(script: str, settings: list[str], base: Path | None) -> str:
    """Hash what decides a part's result: its script, its arguments and its base model's bytes."""
    record = {"script": script, "settings": settings, "base_sha256": base and file_sha256(base)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]


def run_part(
    out: Path, name: str, script: str, settings: list[str], runtime: list[str], base: Path | None
) -> Path:
    """Run one part in its folder, or reuse it when a finished run with this key is there.

    `settings` decide the result and enter the key; `runtime` (data folder, base path, device
    and precision flags) does not. --out and --resume are added here.
    """
    key = part_key(script, settings, base)
    folder = out / f"{name}-{key}"
    record_path = folder / PART_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record and record["finished"]:
        log_event(out, f"reuse {name}: {folder}", {"event": "reuse", "part": name, "key": key})
        return folder

    # A folder with checkpoints but no finished record contains an interrupted run, which the
    # script resumes. One stopped before its first checkpoint starts again from the beginning.
    resume = any(folder.rglob("ckpt_*.safetensors"))
    record = {
        "name": name,
        "script": script,
        "settings": settings,
        "base": None if base is None else str(base),
        "key": key,
        "finished": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record_path, record)
    verb = "resume" if resume else "run"
    log_event(out, f"{verb} {name}: {folder}", {"event": verb, "part": name, "key": key})
    start = time.monotonic()
    SCRIPTS[script]([*settings, *runtime, "--out", str(folder)] + ["--resume"] * resume)
    record.update(finished=True, wall_s=round(time.monotonic() - start, 1))
    write_json(record_path, record)
    log_event(
        out,
        f"done {name} in {record['wall_s'] / 60:.1f} min",
        {"event": "done", "part": name, "key": key, "wall_s": record["wall_s"]},
    )
    return folder


def base_label(out: Path, base: Path) -> str:
    """Name a model file for the report: "<part> <file stem>" inside this study, else its path."""
    record_path = base.parent / PART_FILE
    if base.parent.parent.resolve() == out.resolve() and record_path.is_file():
        return f"{json.loads(record_path.read_text())['name']} {base.stem}"
    return str(base)


def open_study(out: Path, args) -> dict:
    """Read the study record of `out`, or start one. Reject an `out` of another study."""
    path = out / STUDY_FILE
    if not path.is_file():
        return {"dataset": args.dataset, "preset": args.preset, "parts": {}, "compositions": {}}
    study = json.loads(path.read_text())
    for key in ("dataset", "preset"):
        if study[key] != getattr(args, key):
            raise SystemExit(
                f"error: {out} contains a study with --{key} {study[key]}, not "
                f"{getattr(args, key)}; choose another --out"
            )
    return study


def study_base(out: Path, study: dict, args, runtime: list[str]) -> Path:
    """Return the study's base model: trained by this preset's train part, else google's."""
    train_argv = PRESETS[args.preset]["train"]
    if train_argv is None:
        return pretrained_path(args.dataset, args.cache_dir)
    settings = ["--dataset", args.dataset, *train_argv]
    folder = run_part(out, "base", "train", settings, runtime, None)
    study["parts"]["base"] = folder.name
    steps = int(train_argv[train_argv.index("--steps") + 1])
    return checkpoint_path(folder, steps)


def run_study(args) -> Path:
    out = Path(args.out)
    study = open_study(out, args)
    check_data_folder(args.dataset, args.data)
    if args.base is not None and not Path(args.base).is_file():
        raise SystemExit(f"error: --base {args.base} is not a file; pass a model .safetensors file")
    out.mkdir(parents=True, exist_ok=True)
    runtime = [] if args.data is None else ["--data", args.data]
    for flag in ("device", "amp"):
        if getattr(args, flag) is not None:
            runtime += [f"--{flag}", getattr(args, flag)]
    if args.compile is not None:
        runtime.append("--compile" if args.compile else "--no-compile")

    preset = PRESETS[args.preset]
    if args.base is None:
        base = study_base(out, study, args, runtime)
        study["base"] = str(base)
    else:
        base = Path(args.base)
    write_json(out / STUDY_FILE, study)

    for name in args.interventions:
        settings = ["--dataset", args.dataset, *preset[name]]
        if args.inception:
            settings += ["--inception", args.inception]
        part_runtime = [*runtime, BASE_FLAG[name], str(base)]
        if args.base is None:
            if name == "unlearn":
                settings += ["--lambdas", preset["lambdas"]]
            folder = run_part(out, name, name, settings, part_runtime, base)
            study["parts"][name] = folder.name
        else:
            label = base_label(out, base)
            folder = run_part(out, f"{name}-on-{base.stem}", name, settings, part_runtime, base)
            study["compositions"][f"{name} on {label}"] = {
                "intervention": name,
                "part": folder.name,
                "base": label,
            }
        write_json(out / STUDY_FILE, study)
        report.write_report(out)
    return report.write_report(out)


def parse_interventions(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(INTERVENTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a comma-separated subset of {','.join(INTERVENTIONS)}"
        )
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--dataset", choices=["cifar10", "celebahq"], default="cifar10", help="dataset of the study"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="paper",
        help="paper: the study's settings on google's model (GPU); cpu-tiny: a tiny model "
        "trained here and small evaluations (two CPU cores)",
    )
    parser.add_argument("--data", help="dataset folder (CIFAR-10 is downloaded when omitted)")
    parser.add_argument("--out", help="study folder (default: runs/study-<dataset>-<preset>)")
    parser.add_argument(
        "--base", help="start the interventions from this model file (a composition)"
    )
    parser.add_argument(
        "--interventions",
        type=parse_interventions,
        default=",".join(INTERVENTIONS),
        help="comma-separated interventions to run",
    )
    parser.add_argument("--inception", help="Inception weights for FID and IS (.pth)")
    parser.add_argument("--cache-dir", help="download cache of google's checkpoints")
    train.add_runtime_args(parser)
    args = parser.parse_args(argv)
    args.out = args.out or f"runs/study-{args.dataset}-{args.preset}"
    return args


def main(argv=None) -> Path:
    path = run_study(parse_args(argv))
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
