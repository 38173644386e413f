"""Write the report of a study folder: the study's Tables 1-7, the extra tables and the grids.

    python report.py runs/study-cifar10-cpu-tiny

study.py calls write_report after every part. The report reads only the parts' results.json
files, so rewriting it costs no model evaluation. Every table has a protocol line beneath it.
"""

import argparse
import json
from pathlib import Path

import metrics
from unlearn import PAPER_SETTINGS as UNLEARN_SETTINGS
from unlearn import fid_change, format_nll, nll_change

DATASET_NAMES = {"cifar10": "CIFAR-10", "celebahq": "CelebA-HQ"}


def read_results(out: Path, folder: str | None) -> dict | None:
    """Return a part's results.json, or None when the part has not run or not finished."""
    if folder is None:
        return None
    path = out / folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_part(out: Path, folder: str) -> dict | None:
    """Return a part's record, or None when its folder has been deleted."""
    path = out / folder / "part.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------- cells and protocols


def nll_cell(nll: dict) -> str:
    """Format NLL mean ± std over images in bits/dim, with nats/image in brackets."""
    return f"{format_nll(nll, 'bpd')} bits/dim ({format_nll(nll, 'nats')} nats/image)"


def quality_protocol(qualities: list[dict]) -> str:
    """Format the sampling protocol of a table's FID and IS cells as one line."""
    first = qualities[0]
    steps = sorted({q["steps"] for q in qualities}, reverse=True)
    sampling = (
        f"{first['n_samples']:,} samples per cell, {first['sampler']} sampler at "
        f"{'/'.join(map(str, steps))} steps, seed {first['seed']}"
    )
    measured = [q for q in qualities if q["fid"] is not None]
    if not measured:
        # A long reason is cut to its first clause; the parts' results.md files give all of it.
        reason = first["not_computed"]
        if len(reason) > 60:
            reason = reason.split(":")[0]
        return f"FID and IS not computed ({reason}); {sampling}."
    reference = measured[0]["reference"]
    return (
        f"{sampling}; reference statistics of {reference['n_images']:,} {reference['dataset']} "
        f"{reference['split']} images; Inception weights sha256 "
        f"{measured[0]['inception_sha256'][:12]}."
    )


def nll_protocol(nll: dict, description: str, seed: int) -> str:
    return (
        f"NLL: the DDPM variational bound over all steps of the model's schedule, mean ± std over "
        f"{nll['n_images']:,} {description}, noise seed {seed}."
    )


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def section(title: str, body: list[str], protocol: str) -> list[str]:
    return [f"## {title}", "", *body, "", protocol, ""]


def not_run(title: str, script: str) -> list[str]:
    return [f"## {title}", "", f"Not run yet: the study's {script} part has no results.", ""]


# ---------------------------------------------------------------------------- distillation


def distillation_tables(record: dict | None, dataset: str) -> list[str]:
    """Return Tables 1 and 2, and the undistilled same-step control, as markdown lines."""
    if record is None:
        return not_run("Tables 1-2. Progressive distillation", "distill")
    results, args = record["results"], record["args"]
    header = ["Dataset", *(f"{r['steps']} (S{r['stage']})" for r in results)]
    name = DATASET_NAMES[dataset]
    fid = table(header, [[name, *(metrics.format_fid(r["quality"]) for r in results)]])
    nll = table(header, [[name, *(nll_cell(r["nll"]) for r in results)]])

    # The L1 distances of each stage, beside those of the base at the same step count.
    control_rows = [
        [
            str(r["stage"]),
            str(r["steps"]),
            f"{r['l1_to_base_1000']:.4f}",
            "—" if r.get("control_l1") is None else f"{r['control_l1']:.4f}",
        ]
        for r in results
    ]
    control = table(
        ["stage", "steps", "L1 of the model to the base at 1000 steps", "L1 of the undistilled "
         "base at the same steps"],
        control_rows,
    )  # fmt: skip

    test_images = f"held-out {dataset} test images"
    l1_protocol = (
        f"L1: mean absolute difference in [-1, 1] between DDIM (eta 0) samples from the same "
        f"{args['l1_images']} noise images (seed {args['seed'] + 10_000}). A student has "
        "learned something only if its L1 is below the undistilled base's at its step count."
    )
    return [
        *section("Table 1. FID of progressive distillation (lower is better)", fid,
                 quality_protocol([r["quality"] for r in results])),
        *section("Table 2. NLL of progressive distillation (lower is better)", nll,
                 nll_protocol(results[0]["nll"], test_images, args["seed"])),
        *section("Extra: the undistilled base at the students' step counts", control,
                 l1_protocol),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- robustness


def robustness_tables(record: dict | None, dataset: str) -> list[str]:
    """Return Tables 3, 4 and 5, and the NLL of corrupted held-out images."""
    if record is None:
        return not_run("Tables 3-5. Robustness fine-tuning", "robust")
    results, args = record["results"], record["args"]
    header = ["Dataset", *(r["label"] for r in results)]
    name = DATASET_NAMES[dataset]
    fid = table(header, [[name, *(metrics.format_fid(r["quality"]) for r in results)]])
    nll = table(header, [[name, *(nll_cell(r["nll"]) for r in results)]])
    inception = table(header, [[name, *(metrics.format_is(r["quality"]) for r in results)]])

    # One row per model and one column per image set, the clean one first.
    sets = list(results[0]["robustness"])
    corrupted_rows = [
        [r["label"], *(format_nll(r["robustness"][s]["nll"], "bpd") for s in sets)] for r in results
    ]
    corrupted = table(["Fine-tuning steps", *sets], corrupted_rows)

    quality = quality_protocol([r["quality"] for r in results])
    columns = "Columns: fine-tuning steps, the base model first. "
    clean = nll_protocol(results[0]["nll"], f"held-out {dataset} test images", args["seed"])
    first_set = results[0]["robustness"][sets[0]]["nll"]
    corruption_protocol = (
        f"NLL in bits/dim of the first {first_set['n_images']} held-out test images, corrupted "
        f"once by each operator of the {args['corruptions']} family at severity "
        f"{args['severity']} (seed {args['seed']}) and rounded to 8 bits."
    )
    return [
        *section("Table 3. FID after robustness fine-tuning (lower is better)", fid,
                 columns + quality),
        *section("Table 4. NLL after robustness fine-tuning (lower is better)", nll,
                 columns + clean),
        *section("Table 5. Inception Score after robustness fine-tuning (higher is better)",
                 inception, columns + quality),
        *section("Extra: NLL of corrupted held-out images", corrupted, corruption_protocol),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- unlearning


def main_run(record: dict, dataset: str) -> dict:
    """Return the run at the default lambda, which Tables 6 and 7 report, else the last run."""
    lam = UNLEARN_SETTINGS[dataset]["lam"]
    runs = record["runs"]
    matching = [r for r in runs if r["mode"] == "lambda" and r["value"] == lam]
    return (matching or runs)[-1]


def unlearning_tables(record: dict | None, dataset: str) -> list[str]:
    """Return Tables 6 and 7, the keep-set NLL and the lambda sweep."""
    if record is None:
        return not_run("Tables 6-7. Targeted unlearning", "unlearn")
    before, args = record["before"], record["args"]
    run = main_run(record, dataset)
    after = run["after"]
    name = DATASET_NAMES[dataset]
    quality = table(
        ["Dataset", "FID (Before)", "FID (After)", "Δ FID", "IS (Before)", "IS (After)"],
        [[
            name, metrics.format_fid(before["quality"]), metrics.format_fid(after["quality"]),
            fid_change(before, after), metrics.format_is(before["quality"]),
            metrics.format_is(after["quality"]),
        ]],
    )  # fmt: skip

    def nll_rows(key: str, runs: list[dict]) -> list[list[str]]:
        rows = []
        for r in runs:
            increase, ratio = nll_change(before[key], r["after"][key])
            rows.append(
                [r["strength"], nll_cell(before[key]), nll_cell(r["after"][key]),
                 f"{increase:+.4f} bits/dim", f"{ratio:.3f}"]
            )  # fmt: skip
        return rows

    nll_header = ["Strength", "NLL (Before)", "NLL (After)", "Δ NLL", "After/Before"]
    forget = table(nll_header, nll_rows("forget_nll", [run]))
    keep = table(nll_header, nll_rows("keep_nll", record["runs"]))
    sweep_rows = []
    for r in record["runs"]:
        forget_increase, _ = nll_change(before["forget_nll"], r["after"]["forget_nll"])
        keep_increase, _ = nll_change(before["keep_nll"], r["after"]["keep_nll"])
        sweep_rows.append(
            [r["strength"], f"{forget_increase:+.4f}", f"{keep_increase:+.4f}",
             metrics.format_fid(r["after"]["quality"]), metrics.format_is(r["after"]["quality"])]
        )  # fmt: skip
    sweep = table(
        ["Strength", "Δ forget NLL (bits/dim)", "Δ keep NLL (bits/dim)", "FID", "IS"], sweep_rows
    )
    forget_set = f"`{args['forget']}` {args['nll_split']} images"
    training = (
        f"Unlearning: {args['steps']} AdamW steps of {args['batch_size']} keep/forget pairs, "
        f"lr {args['lr']}, seed {args['seed']}. "
    )
    qualities = [before["quality"], *(r["after"]["quality"] for r in record["runs"])]
    return [
        *section(f"Table 6. Sample quality before vs. after unlearning, {run['strength']} "
                 "(lower FID is better)", quality, training + quality_protocol(qualities)),
        *section("Table 7. Forget-set NLL before vs. after unlearning (higher is stronger "
                 "forgetting)", forget,
                 nll_protocol(before["forget_nll"], f"forget-set {forget_set}", args["seed"])),
        *section("Extra: keep-set NLL before vs. after unlearning (lower is better)", keep,
                 nll_protocol(before["keep_nll"], f"keep-set {args['nll_split']} images",
                              args["seed"])),
        *section("Extra: the lambda sweep", sweep,
                 "Δ: after minus before, on the NLL sets of Table 7 and of the keep-set table; "
                 "FID and IS as in Table 6."),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- compositions


def summary(intervention: str, record: dict, dataset: str) -> dict:
    """Return before and after of one intervention: FID, clean or keep-set NLL, forget NLL."""
    if intervention == "unlearn":
        before, after = record["before"], main_run(record, dataset)["after"]
        return {
            "fid": (before["quality"], after["quality"]),
            "nll": (before["keep_nll"], after["keep_nll"]),
            "forget": (before["forget_nll"], after["forget_nll"]),
        }
    first, last = record["results"][0], record["results"][-1]
    return {"fid": (first["quality"], last["quality"]), "nll": (first["nll"], last["nll"])}


def composition_table(out: Path, study: dict) -> list[str]:
    """Return the table of each intervention on the study's base, then on other models."""
    runs = {}
    for entry in study["compositions"].values():
        runs.setdefault(entry["intervention"], []).append((entry["base"], entry["part"]))
    rows = []
    for intervention, started in runs.items():
        direct = study["parts"].get(intervention)
        for base, folder in [("the study's base", direct)] * bool(direct) + started:
            record = read_results(out, folder)
            if record is None:
                continue
            s = summary(intervention, record, study["dataset"])
            forget = s.get("forget")
            rows.append(
                [intervention, base, metrics.format_fid(s["fid"][0]),
                 metrics.format_fid(s["fid"][1]), format_nll(s["nll"][0], "bpd"),
                 format_nll(s["nll"][1], "bpd"),
                 "—" if forget is None else format_nll(forget[0], "bpd"),
                 "—" if forget is None else format_nll(forget[1], "bpd")]
            )  # fmt: skip
    if not rows:
        return []
    body = table(
        ["Intervention", "Started from", "FID before", "FID after", "NLL before (bits/dim)",
         "NLL after", "Forget NLL before", "Forget NLL after"],
        rows,
    )  # fmt: skip
    protocol = (
        "Before: the starting model; after: the last distillation stage, the last robustness "
        "checkpoint, or the unlearning run at the default lambda. NLL: held-out test images for "
        "distillation and robustness, keep-set images for unlearning; each intervention's "
        "protocol lines above apply."
    )
    return section("Compositions of interventions", body, protocol)


# ---------------------------------------------------------------------------- report


def grids(out: Path, study: dict) -> list[str]:
    """Return markdown links to every sample grid and corruption grid of the study's parts."""
    folders = [*study["parts"].values(), *(e["part"] for e in study["compositions"].values())]
    images = [p for folder in folders for p in (out / folder).rglob("*.png")]
    # Part by part, the files of a part's own folder before those of its subfolders.
    images.sort(key=lambda p: (p.relative_to(out).parts[0], len(p.parts), str(p)))
    if not images:
        return []
    links = [f"![{p.relative_to(out)}]({p.relative_to(out).as_posix()})" for p in images]
    return ["## Sample grids", "", *links, ""]


def parts_table(out: Path, study: dict) -> list[str]:
    folders = {**study["parts"], **{k: e["part"] for k, e in study["compositions"].items()}}
    rows = []
    for role, folder in folders.items():
        part = read_part(out, folder)
        if part is None:
            wall = "folder missing"
        else:
            wall = f"{part['wall_s'] / 60:.1f} min" if part["finished"] else "unfinished"
        rows.append([role, f"`{folder}`", wall])
    return table(["Part", "Folder", "Wall time"], rows)


def write_report(out: str | Path) -> Path:
    """Write `<out>/report.md` from the study record and the parts' results."""
    out = Path(out)
    if not (out / "study.json").is_file():
        raise FileNotFoundError(
            f"{out} contains no study.json; pass the --out folder of a study.py run"
        )
    study = json.loads((out / "study.json").read_text())
    dataset = study["dataset"]
    parts = {name: read_results(out, study["parts"].get(name)) for name in
             ("distill", "robust", "unlearn")}  # fmt: skip
    lines = [
        f"# The study on {DATASET_NAMES[dataset]}, preset {study['preset']}",
        "",
        f"Base model: `{study.get('base', 'not set')}`. Written by study.py; each part's own "
        "results.md, config.json and log.jsonl are in its folder.",
        "",
        *parts_table(out, study),
        "",
        *distillation_tables(parts["distill"], dataset),
        *robustness_tables(parts["robust"], dataset),
        *unlearning_tables(parts["unlearn"], dataset),
        *composition_table(out, study),
        *grids(out, study),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="study folder that contains study.json")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.out))
    except FileNotFoundError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
