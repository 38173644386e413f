"""Tests for robust.py: settings, evaluation helpers and a tiny end-to-end run on real images."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import metrics
import robust
from checkpoint import load_model, save_model
from diffusion import Diffusion, DiffusionConfig
from unet import PRESETS, UNet, UNetConfig


def data_dir() -> Path:
    """Return $DDPM_DATA. Skip when it is unset, and fail when it names no folder."""
    root = os.environ.get("DDPM_DATA")
    if not root:
        pytest.skip("DDPM_DATA is not set; set it to the data folder to run real-image tests")
    assert Path(root).is_dir(), f"DDPM_DATA={root} is not a folder"
    return Path(root)


def tiny_base(path: Path, size: int = 16, T: int = 5) -> Path:
    """Save a randomly initialized tiny UNet with a T-step schedule as a base model file."""
    torch.manual_seed(0)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": size})
    save_model(path, UNet(config), DiffusionConfig(T=T))
    return path


# ---------------------------------------------------------------- settings


def test_paper_settings_cifar10():
    args = robust.parse_args(["--dataset", "cifar10"])
    assert args.checkpoint_steps == (500, 1000, 1500, 2000)
    assert args.lr == 2e-4
    assert args.batch_size == 128
    assert args.dropout == 0.1
    assert args.corruptions == "proxy"
    assert args.severity == 3
    assert args.clean_probability == 0.2


def test_paper_settings_celebahq():
    args = robust.parse_args(["--dataset", "celebahq"])
    assert args.checkpoint_steps == (50, 100, 150, 200)
    assert args.lr == 2e-5
    assert args.batch_size == 64
    assert args.dropout == 0.0


def test_steps_scale_scales_paper_steps():
    cifar = robust.parse_args(["--dataset", "cifar10", "--steps-scale", "0.01"])
    assert cifar.checkpoint_steps == (5, 10, 15, 20)
    celebahq = robust.parse_args(["--dataset", "celebahq", "--steps-scale", "0.1"])
    assert celebahq.checkpoint_steps == (5, 10, 15, 20)


def test_steps_scale_rejects_repeats():
    with pytest.raises(SystemExit):
        robust.parse_args(["--dataset", "cifar10", "--steps-scale", "0.0001"])


def test_checkpoint_steps_explicit():
    args = robust.parse_args(["--checkpoint-steps", "2,4,6,8"])
    assert args.checkpoint_steps == (2, 4, 6, 8)


@pytest.mark.parametrize("text", ["4,2", "0,1", "a,b", ""])
def test_checkpoint_steps_rejects_invalid(text):
    with pytest.raises(SystemExit):
        robust.parse_args(["--checkpoint-steps", text])


def test_proxy_family_rejects_severity_2():
    with pytest.raises(SystemExit):
        robust.parse_args(["--corruptions", "proxy", "--severity", "2"])


def test_cifar10c_family_accepts_severity_5():
    args = robust.parse_args(["--corruptions", "cifar10c", "--severity", "5"])
    assert args.severity == 5


# ---------------------------------------------------------------- evaluation helpers


def test_corrupted_sets_are_uint8_per_corruption():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    sets = robust.corrupted_sets(images, "proxy", 3, seed=1)
    assert list(sets) == ["clean", "gaussian_noise", "defocus_blur", "fog", "jpeg_compression"]
    assert torch.equal(sets["clean"], images)
    for name, corrupted in sets.items():
        assert corrupted.dtype == torch.uint8, name
        assert corrupted.shape == images.shape, name
    assert not torch.equal(sets["fog"], images)


def test_corrupted_sets_same_seed_reproduces():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    first = robust.corrupted_sets(images, "cifar10c", 3, seed=1)
    second = robust.corrupted_sets(images, "cifar10c", 3, seed=1)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow
def test_denoising_loss_fixed_draws():
    torch.manual_seed(0)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": 16})
    model = UNet(config).eval()
    diffusion = Diffusion(DiffusionConfig(T=10))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)

    first = robust.denoising_loss(model, diffusion, images, batch_size=2, seed=4, draws=2)
    second = robust.denoising_loss(model, diffusion, images, batch_size=2, seed=4, draws=2)
    other = robust.denoising_loss(model, diffusion, images, batch_size=2, seed=5, draws=2)
    assert first == second
    assert first["loss_mean"] != other["loss_mean"]
    assert first["n_images"] == 4
    assert first["draws"] == 2

    # The mean equals L_simple recomputed with the same generator stream.
    generator = torch.Generator().manual_seed(4)
    expected = []
    for batch in images.split(2):
        x_0 = batch.float() / 127.5 - 1
        total = torch.zeros(len(batch), dtype=torch.float64)
        for _ in range(2):
            t = torch.randint(0, 10, (len(batch),), generator=generator)
            eps = torch.randn(x_0.shape, generator=generator)
            with torch.no_grad():
                total += (
                    ((eps - model(diffusion.q_sample(x_0, t, eps), t)) ** 2)
                    .mean(dim=(1, 2, 3))
                    .double()
                )
        expected.append(total / 2)
    assert first["loss_mean"] == pytest.approx(torch.cat(expected).mean().item(), rel=1e-5)


def test_existing_checkpoints_need_resume(tmp_path):
    (tmp_path / "ckpt_0000001.safetensors").write_bytes(b"")
    argv = ["--out", str(tmp_path), "--base", str(tmp_path / "missing.safetensors")]
    with pytest.raises(SystemExit, match="--resume"):
        robust.main(argv)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_run_writes_checkpoints_and_tables(tmp_path, monkeypatch):
    data = data_dir()
    base = tiny_base(tmp_path / "base.safetensors")

    # load_inception raises as it would offline, so no download is attempted. FID and IS must
    # then be reported as not computed, after the real sampling path has run.
    def no_inception(*args, **kwargs):
        raise metrics.InceptionWeightsNotFound("no Inception weights in this test")

    monkeypatch.setattr(metrics, "load_inception", no_inception)
    out = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data", str(data), "--base", str(base)]
    argv += ["--out", str(out), "--checkpoint-steps", "1,2,3,4", "--batch-size", "4"]
    argv += ["--nll-images", "2", "--robust-images", "2", "--loss-draws", "2"]
    argv += ["--fid-samples", "2", "--sample-steps", "5", "--eval-batch-size", "2"]
    argv += ["--grid-images", "2", "--log-every", "2", "--device", "cpu"]
    results = robust.main(argv)

    # Four checkpoints that load, each with its sidecar.
    for step in (1, 2, 3, 4):
        path = out / f"ckpt_{step:07d}.safetensors"
        assert path.is_file(), path
        assert path.with_suffix(".json").is_file(), path
        model, diffusion_config = load_model(path)
        assert diffusion_config.T == 5
    assert model.config.dropout == 0.1

    # Base plus four checkpoints, each with clean and per-corruption numbers.
    assert [r["step"] for r in results] == [0, 1, 2, 3, 4]
    for r in results:
        assert r["nll"]["n_images"] == 2
        assert r["quality"]["fid"] is None
        assert "no Inception weights" in r["quality"]["not_computed"]
        assert list(r["robustness"]) == [
            "clean",
            "gaussian_noise",
            "defocus_blur",
            "fog",
            "jpeg_compression",
        ]
        assert r["robustness"]["clean"]["nll"] == r["nll"]
        for entry in r["robustness"].values():
            assert entry["nll"]["bpd_mean"] > 0
            assert entry["loss"]["loss_mean"] > 0
    assert results[4]["robustness"]["fog"] != results[0]["robustness"]["fog"]

    # The samples for FID were drawn.
    assert (out / "fid_step0000004" / "samples" / "samples.json").is_file()

    # Both tables in markdown and the same numbers in JSON.
    text = (out / "results.md").read_text()
    assert "FID after robustness fine-tuning" in text
    assert "NLL of clean held-out images" in text
    assert "Inception Score" in text
    assert "NLL in bits/dim of corrupted held-out images" in text
    assert "L_simple of corrupted held-out images" in text
    assert "| Dataset | base | 1 | 2 | 3 | 4 |" in text
    assert (
        "| Fine-tuning steps | clean | gaussian_noise | defocus_blur | fog | jpeg_compression |"
        in text
    )
    stored = json.loads((out / "results.json").read_text())
    assert len(stored["results"]) == 5
    assert stored["results"][2]["nll"]["bpd_mean"] == results[2]["nll"]["bpd_mean"]

    # The corruption grid: a clean row and the four proxies at severity 3.
    with Image.open(out / "corruption_grid.png") as grid:
        assert grid.height == 5 * (96 + 2)
