import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from checkpoint import load_model, save_model
from data import BatchIterator
from diffusion import Diffusion, DiffusionConfig
from train import TrainConfig, latest_checkpoint, train_loop
from unet import PRESETS, UNet, UNetConfig

REPO = Path(__file__).resolve().parent


def small_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    config = UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "sample_size": 16, "dropout": 0.0})
    return UNet(config)


def random_images(count: int = 24, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def run_training(out_dir, steps, resume=False, checkpoint_steps=(), batch_size=4):
    model = small_unet()
    diffusion = Diffusion(DiffusionConfig())
    batches = BatchIterator(random_images(), batch_size, seed=3)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=1e-3,
        warmup=2,
        log_every=2,
        save_every=2,
        checkpoint_steps=checkpoint_steps,
        seed=5,
        ema_decay=0.99,
    )
    return train_loop(model, diffusion, batches, config, out_dir, {"script": "test"}, resume=resume)


def test_resume_gives_identical_weights(tmp_path):
    straight, straight_ema = run_training(tmp_path / "straight", steps=6)
    run_training(tmp_path / "split", steps=4)
    resumed, resumed_ema = run_training(tmp_path / "split", steps=6, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight_ema.state_dict().items(), resumed_ema.state_dict().values()):
        assert torch.equal(a, b), name


def test_rolling_checkpoints_keep_requested_steps(tmp_path):
    run_training(tmp_path, steps=6, checkpoint_steps=(2,))
    names = sorted(p.name for p in tmp_path.glob("ckpt_*.safetensors"))
    assert "ckpt_0000002.safetensors" in names
    assert "ckpt_0000004.safetensors" not in names
    assert "ckpt_0000006.safetensors" in names
    assert latest_checkpoint(tmp_path).name == "ckpt_0000006.safetensors"


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_training(tmp_path, steps=2, resume=True)


def test_divergence_stops_and_keeps_checkpoint(tmp_path):
    run_training(tmp_path, steps=2)
    before = (tmp_path / "ckpt_0000002.safetensors").read_bytes()

    def exploding_step(model, x_0, t, eps):
        return model(x_0, t).sum() * float("nan")

    model = small_unet()
    diffusion = Diffusion()
    config = TrainConfig(steps=4, batch_size=4, lr=1e-3, save_every=1)
    batches = BatchIterator(random_images(), 4)
    with pytest.raises(FloatingPointError, match="diverged at step 1: loss nan"):
        train_loop(model, diffusion, batches, config, tmp_path, {}, step_fn=exploding_step)
    assert (tmp_path / "ckpt_0000002.safetensors").read_bytes() == before


KILL_DURING_SAVE = textwrap.dedent(
    """
    import sys, time
    import safetensors.torch
    import checkpoint
    from diffusion import DiffusionConfig
    from unet import PRESETS, UNet

    real_save = safetensors.torch.save_file

    def slow_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        print("writing", flush=True)
        time.sleep(60)

    checkpoint.save_file = slow_save
    checkpoint.save_model(sys.argv[1], UNet(PRESETS["tiny"]), DiffusionConfig())
    """
)


def test_kill_during_save_keeps_previous(tmp_path):
    path = tmp_path / "ckpt_0000001.safetensors"
    model = small_unet(seed=1)
    save_model(path, model, DiffusionConfig())

    process = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    loaded, _ = load_model(path, weights="model")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_worker(rank, world, port, out_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    run_training(out_dir, steps=4, batch_size=8)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    single, _ = run_training(tmp_path / "single", steps=4, batch_size=8)
    start = time.time()
    mp.spawn(distributed_worker, args=(2, free_port(), tmp_path / "ddp"), nprocs=2, join=True)
    assert time.time() - start < 300
    ddp, _ = load_model(tmp_path / "ddp" / "ckpt_0000004.safetensors", weights="model")
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), (name, (a - b).abs().max())
