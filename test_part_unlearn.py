"""Tests for unlearn.py: the SISS objective, the forget-gradient rescaling and a tiny real run."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import metrics
import unlearn
from checkpoint import load_model, save_model
from diffusion import Diffusion, DiffusionConfig
from train import ddpm_step
from unet import PRESETS, UNet

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def data_root() -> Path:
    """Return the real-data folder from DDPM_DATA; skip when unset, fail when missing."""
    value = os.environ.get("DDPM_DATA")
    if not value:
        pytest.skip("DDPM_DATA is not set; set it to the data folder to run tests on real images")
    root = Path(value)
    assert root.is_dir(), f"DDPM_DATA={value} is not a folder"
    return root


@pytest.fixture
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(PRESETS["tiny"]).eval()


@pytest.fixture
def paired_batch():
    """Keep and forget images in [-1, 1] with shared timesteps and noise."""
    generator = torch.Generator().manual_seed(1)
    x_keep = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    x_forget = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    t = torch.randint(0, 1000, (3,), generator=generator)
    eps = torch.randn(3, 3, 32, 32, generator=generator)
    return x_keep, x_forget, t, eps


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    """Save a random tiny UNet with a 20-step schedule, so that the NLL takes 20 forwards."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_model(path, UNet(PRESETS["tiny"]), DiffusionConfig(T=20))
    return path


def tiny_run_args(data_root: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data_root),
        "--base",
        str(base),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--save-every",
        "1",
        "--log-every",
        "1",
        "--nll-images",
        "2",
        "--eval-batch-size",
        "2",
        "--grid-images",
        "4",
        "--sample-steps",
        "5",
        *extra,
    ]


# ---------------------------------------------------------------------------- objective


def test_siss_loss_equals_separate_terms(tiny_model, paired_batch):
    x_keep, x_forget, t, eps = paired_batch
    diffusion = Diffusion()
    loss = unlearn.siss_step(diffusion, 0.3)(tiny_model, x_keep, x_forget, t, eps)
    loss_keep = diffusion.training_loss(tiny_model, x_keep, t, eps).mean()
    loss_forget = diffusion.training_loss(tiny_model, x_forget, t, eps).mean()
    assert torch.allclose(loss, loss_keep - 0.3 * loss_forget, rtol=1e-5, atol=1e-7)


def test_siss_terms_share_t_and_eps(tiny_model, paired_batch):
    # With identical keep and forget batches, only shared t and eps give L_keep == L_forget.
    x_keep, _, t, eps = paired_batch
    diffusion = Diffusion()
    loss_keep, loss_forget = unlearn.paired_losses(diffusion, tiny_model, x_keep, x_keep, t, eps)
    assert torch.allclose(loss_keep, loss_forget, rtol=1e-6, atol=0)


def test_lambda_zero_is_ddpm_loss(tiny_model, paired_batch):
    x_keep, x_forget, t, eps = paired_batch
    diffusion = Diffusion()
    loss = unlearn.siss_step(diffusion, 0.0)(tiny_model, x_keep, x_forget, t, eps)
    plain = ddpm_step(diffusion)(tiny_model, x_keep, t, eps)
    assert torch.allclose(loss, plain, rtol=1e-5, atol=1e-7)


def test_forget_gradient_rescaled_to_norm(tiny_model, paired_batch):
    x_keep, x_forget, t, eps = paired_batch
    diffusion = Diffusion()
    parameters = list(tiny_model.parameters())

    # Gradient of the keep term alone, and of the forget term alone.
    diffusion.training_loss(tiny_model, x_keep, t, eps).mean().backward()
    grad_keep = [p.grad.clone() for p in parameters]
    tiny_model.zero_grad(set_to_none=True)
    diffusion.training_loss(tiny_model, x_forget, t, eps).mean().backward()
    grad_forget = [p.grad.clone() for p in parameters]
    tiny_model.zero_grad(set_to_none=True)

    # The rescaled step: g = g_keep - (S / ||g_forget||) g_forget.
    norm = 7.5
    losses = unlearn.split_losses_step(diffusion)(tiny_model, x_keep, x_forget, t, eps)
    logged = unlearn.forget_grad_norm_backward(norm)(tiny_model, losses)
    subtracted = torch.cat(
        [(k - p.grad).flatten() for k, p in zip(grad_keep, parameters, strict=True)]
    )
    forget = torch.cat([g.flatten() for g in grad_forget])
    scale = norm / forget.norm()
    cosine = torch.dot(subtracted, forget) / (subtracted.norm() * forget.norm())
    assert math.isclose(subtracted.norm().item(), norm, rel_tol=1e-4)
    assert cosine.item() > 0.9999
    assert torch.allclose(logged, (losses[0] - scale * losses[1]).detach(), rtol=1e-4)


def test_paired_batches_resume_exactly():
    keep = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    forget = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    uninterrupted = unlearn.PairedBatches(keep, forget, batch_size=2, seed=3)
    expected = [next(uninterrupted) for _ in range(8)]

    interrupted = unlearn.PairedBatches(keep, forget, batch_size=2, seed=3)
    for _ in range(3):
        next(interrupted)
    resumed = unlearn.PairedBatches(keep, forget, batch_size=2, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    for step in range(3, 8):
        keep_batch, forget_batch = next(resumed)
        assert torch.equal(keep_batch, expected[step][0]), f"keep batch {step} differs"
        assert torch.equal(forget_batch, expected[step][1]), f"forget batch {step} differs"


@pytest.mark.parametrize(
    "quality, fid, inception_score",
    [
        (None, "n/a", "n/a"),
        ({"fid": None, "is_mean": None, "is_std": None}, "n/a", "n/a"),
        ({"fid": 12.345, "is_mean": None, "is_std": None}, "12.35", "n/a"),
        ({"fid": 12.345, "is_mean": 3.21, "is_std": 0.05}, "12.35", "3.21 ± 0.05"),
    ],
)
def test_score_cells_handle_missing(quality, fid, inception_score):
    assert unlearn.format_score(quality, "fid") == fid
    assert unlearn.format_score(quality, "is") == inception_score


# ---------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lambda", "1", "--forget-grad-norm", "5"], "not both"),
        (["--lambdas", "0.1,-1"], "non-negative"),
        (["--forget-grad-norms", "0"], "positive"),
        (["--lambdas", "0.1,x"], "invalid list"),
    ],
)
def test_invalid_strengths_rejected(capsys, flags, message):
    with pytest.raises(SystemExit):
        unlearn.parse_args(flags)
    assert message in capsys.readouterr().err


def test_strength_defaults_per_dataset():
    args = unlearn.parse_args(["--dataset", "celebahq", "--forget-grad-norms", "100,500"])
    assert [s.label for s in args.strengths] == ["forget-grad-norm 100", "forget-grad-norm 500"]
    assert args.lr == 5e-6
    assert args.steps == 60
    assert args.forget == "Smiling"
    default = unlearn.parse_args([])
    assert [s.label for s in default.strengths] == ["lambda 1"]
    assert default.forget == "airplane"


# ---------------------------------------------------------------------------- tiny real runs


@pytest.mark.slow
def test_unlearn_tiny_cifar_run(data_root, tiny_base, tmp_path):
    out = tmp_path / "run"
    common = tiny_run_args(data_root, tiny_base, out, "--fid-samples", "0")
    unlearn.main(["--dataset", "cifar10", *common, "--lambdas", "0,1"])

    report = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert "layout of Table 6" in report
    assert "layout of Table 7" in report
    assert "## Pareto" in report
    assert "| lambda 0 |" in report
    assert "| lambda 1 |" in report
    assert [run["strength"] for run in results["runs"]] == ["lambda 0", "lambda 1"]
    assert results["before"]["forget_nll"]["n_images"] == 2
    assert math.isfinite(results["runs"][1]["after"]["forget_nll"]["bpd_mean"])
    assert (out / "samples_before.png").is_file()
    assert (out / "lambda_1" / "samples_after.png").is_file()
    assert (out / "lambda_1" / "ckpt_0000002.safetensors").is_file()

    # Two AdamW steps move every parameter that gets a gradient.
    base, _ = load_model(tiny_base)
    after, _ = load_model(out / "lambda_1" / "ckpt_0000002.safetensors")
    unchanged = [
        name
        for (name, p), q in zip(base.named_parameters(), after.parameters(), strict=True)
        if torch.equal(p, q)
    ]
    assert unchanged == []

    # A second run reuses the finished one, unless a setting differs.
    unlearn.main(["--dataset", "cifar10", *common, "--lambda", "1"])
    log = (out / "lambda_1" / "log.jsonl").read_text()
    assert '"event": "reuse"' in log
    with pytest.raises(ValueError, match="lr=1e-05, but this run has lr=0.001"):
        unlearn.main(["--dataset", "cifar10", *common, "--lambdas", "0,1", "--lr", "1e-3"])


@pytest.mark.slow
def test_unlearn_tiny_celebahq_grad_norm(data_root, tiny_base, tmp_path, monkeypatch):
    # A stand-in for metrics.evaluate, so that the FID and IS columns are filled without
    # Inception weights; each call returns a larger FID.
    calls = []

    def fake_evaluate(model, diffusion, **kwargs):
        calls.append(kwargs)
        fid = 10.0 * len(calls)
        return {
            "fid": fid,
            "is_mean": 2.0,
            "is_std": 0.1,
            "not_computed": None,
            "n_samples": kwargs["n_samples"],
            "sampler": kwargs["sampler"],
            "steps": kwargs["steps"],
            "seed": kwargs["seed"],
            "reference": None,
        }

    monkeypatch.setattr(metrics, "evaluate", fake_evaluate)
    monkeypatch.setitem(metrics.DATASET_DEFAULTS["celebahq"], "image_size", 32)
    out = tmp_path / "run"
    argv = tiny_run_args(
        data_root, tiny_base, out, "--forget-grad-norm", "0.5", "--fid-samples", "8"
    )
    unlearn.main(["--dataset", "celebahq", *argv])

    report = (out / "results.md").read_text()
    assert len(calls) == 2
    assert calls[0]["dataset"] == "celebahq"
    assert calls[0]["n_samples"] == 8
    assert "| forget-grad-norm 0.5 | 10.00 | 20.00 | +10.00 |" in report
    assert (out / "forget_grad_norm_0.5" / "ckpt_0000002.safetensors").is_file()


def test_divergence_keeps_last_checkpoint(data_root, tiny_base, tmp_path, monkeypatch):
    # The loss turns NaN at the third step, after the checkpoint of step 2 was saved.
    real_step = unlearn.siss_step

    def diverging_step(diffusion, lam):
        step = real_step(diffusion, lam)
        count = {"calls": 0}

        def wrapped(*args):
            count["calls"] += 1
            loss = step(*args)
            return loss * float("nan") if count["calls"] == 3 else loss

        return wrapped

    monkeypatch.setattr(unlearn, "siss_step", diverging_step)
    out = tmp_path / "run"
    argv = tiny_run_args(data_root, tiny_base, out, "--fid-samples", "0")
    argv[argv.index("--steps") + 1] = "4"
    with pytest.raises(FloatingPointError, match="step 3") as error:
        unlearn.main(["--dataset", "cifar10", *argv])
    assert "nan" in str(error.value)
    assert (out / "lambda_1" / "ckpt_0000002.safetensors").is_file()
    assert not (out / "lambda_1" / "ckpt_0000003.safetensors").exists()
