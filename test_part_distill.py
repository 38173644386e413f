import json
import os
from pathlib import Path

import pytest
import torch

import distill
from checkpoint import save_model
from diffusion import Diffusion, DiffusionConfig
from unet import PRESETS, UNet, UNetConfig


def data_dir() -> Path:
    root = os.environ.get("DDPM_DATA")
    if not root:
        pytest.skip("DDPM_DATA is not set: real-image tests need the data folder")
    path = Path(root)
    assert path.is_dir(), f"DDPM_DATA={root} is not a folder"
    return path


def point_mass_oracle(diffusion: Diffusion, x_star: torch.Tensor):
    def model(x_t, t):
        alpha_bar = diffusion.alpha_bar[t].float().view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * x_star) / (1 - alpha_bar).sqrt()

    return model


@pytest.mark.parametrize("teacher_steps", [1000, 500])
def test_teacher_targets_align_with_student(teacher_steps):
    """With an exact denoiser DDIM is exact at any step count, so a student running the same
    network must land on every teacher target; an off-by-one pairing would not."""
    diffusion = Diffusion(DiffusionConfig(clip_sample=False))
    x_star = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    oracle = point_mass_oracle(diffusion, x_star)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    targets = list(distill.ddim_pair_targets(diffusion, oracle, x_T, teacher_steps, "off"))
    assert len(targets) == teacher_steps // 2

    timesteps = diffusion.timesteps(teacher_steps // 2).tolist()
    x = x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = diffusion.ddim_step(x, t, t_prev, oracle(x, torch.full((2,), t)))
        assert torch.allclose(x, targets[i], atol=1e-4), (t, (x - targets[i]).abs().max())


@pytest.mark.slow
def test_distill_two_stages_on_real_images(tmp_path):
    root = data_dir()
    torch.manual_seed(0)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": 16, "dropout": 0.0})
    teacher = tmp_path / "teacher.safetensors"
    save_model(teacher, UNet(config), DiffusionConfig())

    out = tmp_path / "out"
    results = distill.main(
        [
            "--dataset", "cifar10", "--stage", "2", "--teacher", str(teacher),
            "--data", str(root), "--out", str(out), "--image-size", "16",
            "--batch-size", "2", "--trajectories", "1", "--nll-images", "2",
            "--fid-samples", "0", "--grid-images", "2", "--l1-images", "2",
        ]
    )  # fmt: skip
    assert [r["steps"] for r in results] == [1000, 500, 250]
    assert (out / "stage1.safetensors").is_file()
    assert (out / "stage2.safetensors").is_file()
    assert (out / "samples_stage2_250steps.png").is_file()
    assert "| 2 | 250 |" in (out / "results.md").read_text()
    record = json.loads((out / "results.json").read_text())
    assert record["results"][2]["control_l1"] >= 0
    assert results[0]["l1_to_base_1000"] < 1e-6
    log = (out / "log.jsonl").read_text()
    assert '"event": "train_missing_stage"' in log
