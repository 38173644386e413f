"""Tests of unet.py: equivalence with diffusers' UNet2DModel, conversion, export and fetching."""

import functools
import http.server
import json
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import unet
from checkpoint import load_model, save_model
from diffusion import DiffusionConfig
from unet import PRESETS, UNet, UNetConfig

# Maximum absolute difference in fp32 between our UNet and UNet2DModel on the same weights.
EQUIVALENCE_TOLERANCE = 1e-4
TINY_MAX_PARAMETERS = 2_000_000


def import_diffusers():
    """Import diffusers, the test-only oracle, or fail with the install command."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            "diffusers is a test-only oracle: pip install -r requirements-test.txt"
        ) from err
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def diffusers_unet(config: UNetConfig, seed: int):
    """Build a UNet2DModel for `config` with every parameter drawn at random."""
    diffusers = import_diffusers()
    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs).eval()
    randomize_weights(model, seed)
    return model


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter, zero-initialised ones included, so outputs are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)


def save_diffusers_dir(model, folder: Path, variance_type: str = "fixed_large") -> Path:
    """Save `model` with save_pretrained and a DDPMScheduler config beside it."""
    diffusers = import_diffusers()
    model.save_pretrained(folder)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=True,
    )
    scheduler.save_config(folder)
    return folder


def max_output_difference(reference, ours: UNet, size: int, batch: int = 2) -> float:
    """Return max |reference - ours| on random inputs, t taken from 0, 999, 500, 17 in order."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    t = torch.tensor([0, 999, 500, 17][:batch])
    with torch.no_grad():
        expected = reference(x, t).sample
        actual = ours.eval()(x, t)
    assert expected.abs().mean() > 0.01, "random weights gave a near-zero output"
    return (expected - actual).abs().max().item()


@pytest.fixture(scope="module")
def cifar10_reference(tmp_path_factory):
    """Random-weight CIFAR-10 UNet2DModel, saved as a diffusers directory."""
    model = diffusers_unet(PRESETS["cifar10"], seed=10)
    folder = save_diffusers_dir(model, tmp_path_factory.mktemp("cifar10_diffusers"))
    return model, folder


@pytest.fixture(scope="module")
def celebahq_reference(tmp_path_factory):
    """Random-weight CelebA-HQ UNet2DModel (113.7M parameters), saved in the unet/ layout."""
    model = diffusers_unet(PRESETS["celebahq"], seed=11)
    root = tmp_path_factory.mktemp("celebahq_pipeline")
    save_diffusers_dir(model, root / "unet", variance_type="fixed_small")
    (root / "unet" / "scheduler_config.json").rename(root / "scheduler_config.json")
    return model, root


# --------------------------------------------------------------------------- config


def test_config_json_roundtrip():
    for name, config in PRESETS.items():
        restored = UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert restored == config, name


def test_config_from_dict_names_unknown_key():
    values = {**PRESETS["tiny"].to_dict(), "attention_resolutions": [16]}
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig.from_dict(values)


def test_config_diffusers_roundtrip():
    for name, config in PRESETS.items():
        assert UNetConfig.from_diffusers(config.to_diffusers()) == config, name


def test_config_rejects_unsupported_block():
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        replace(
            PRESETS["tiny"], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        )


def test_from_diffusers_rejects_fourier_embedding():
    config_json = {**PRESETS["cifar10"].to_diffusers(), "time_embedding_type": "fourier"}
    with pytest.raises(ValueError, match="time_embedding_type"):
        UNetConfig.from_diffusers(config_json)


def test_from_diffusers_rejects_multihead_attention():
    config_json = {**PRESETS["cifar10"].to_diffusers(), "attention_head_dim": 64}
    with pytest.raises(ValueError, match="attention_head_dim=64"):
        UNetConfig.from_diffusers(config_json)


def test_from_diffusers_missing_head_dim_rejected():
    # UNet2DModel's default attention_head_dim is 8, which means multi-head attention.
    config_json = PRESETS["cifar10"].to_diffusers()
    del config_json["attention_head_dim"]
    with pytest.raises(ValueError, match="attention_head_dim=8"):
        UNetConfig.from_diffusers(config_json)


def test_from_diffusers_accepts_head_dim_equal_channels():
    config = replace(PRESETS["tiny"], block_out_channels=(32, 64, 64))
    config_json = {**config.to_diffusers(), "attention_head_dim": 64}
    assert UNetConfig.from_diffusers(config_json) == config


def test_from_diffusers_missing_dropout_is_zero():
    # config.json files without a dropout key, such as google's, get UNet2DModel's default 0.0.
    config_json = PRESETS["cifar10"].to_diffusers()
    del config_json["dropout"]
    assert UNetConfig.from_diffusers(config_json).dropout == 0.0


def test_tiny_preset_within_parameter_bound():
    count = sum(p.numel() for p in UNet(PRESETS["tiny"]).parameters())
    assert count <= TINY_MAX_PARAMETERS


def test_scheduler_rejects_cosine_schedule():
    with pytest.raises(ValueError, match="beta_schedule"):
        unet.diffusion_config_from_scheduler({"beta_schedule": "squaredcos_cap_v2"})


def test_scheduler_maps_ddpm_settings():
    config = unet.diffusion_config_from_scheduler(
        {"num_train_timesteps": 1000, "variance_type": "fixed_large", "clip_sample": True}
    )
    assert config == DiffusionConfig(T=1000, variance_type="fixed_large", clip_sample=True)


# --------------------------------------------------------------------------- equivalence


def test_forward_scalar_timestep_broadcasts():
    model = UNet(PRESETS["tiny"]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, torch.full((3,), 250))
        actual = model(x, torch.tensor(250))
    assert torch.equal(actual, expected)


def test_forward_rejects_indivisible_size():
    model = UNet(PRESETS["tiny"])
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 30, 30), torch.tensor([1]))


@pytest.mark.slow
def test_cifar10_conversion_matches_diffusers(cifar10_reference, tmp_path):
    reference, folder = cifar10_reference
    unet.convert(folder, tmp_path / "cifar10.safetensors")
    ours, diffusion_config = load_model(tmp_path / "cifar10.safetensors")

    assert ours.config == PRESETS["cifar10"]
    assert diffusion_config.variance_type == "fixed_large"
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE


@pytest.mark.slow
def test_celebahq_conversion_matches_diffusers(celebahq_reference, tmp_path):
    reference, root = celebahq_reference
    unet.convert(root, tmp_path / "celebahq.safetensors")
    ours, diffusion_config = load_model(tmp_path / "celebahq.safetensors")

    assert ours.config == PRESETS["celebahq"]
    assert diffusion_config.variance_type == "fixed_small"
    assert max_output_difference(reference, ours, size=64, batch=1) < EQUIVALENCE_TOLERANCE


@pytest.mark.slow
def test_bin_with_legacy_names_converts(cifar10_reference, tmp_path):
    reference, folder = cifar10_reference
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in reference.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert "mid_block.attentions.0.proj_attn.weight" in state
    torch.save(state, tmp_path / "weights.bin")

    dst = tmp_path / "converted.safetensors"
    unet.main(
        [
            "convert",
            str(tmp_path / "weights.bin"),
            str(dst),
            "--config",
            str(folder / "config.json"),
            "--scheduler-config",
            str(folder / "scheduler_config.json"),
        ]
    )
    ours, _ = load_model(dst)
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE


@pytest.mark.slow
def test_export_loads_in_diffusers(cifar10_reference, tmp_path):
    diffusers = import_diffusers()
    reference, folder = cifar10_reference
    unet.convert(folder, tmp_path / "model.safetensors")
    unet.main(["export", str(tmp_path / "model.safetensors"), str(tmp_path / "exported")])
    ours, _ = load_model(tmp_path / "model.safetensors")

    reloaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "exported")
    assert max_output_difference(reloaded, ours, size=32) < EQUIVALENCE_TOLERANCE
    assert scheduler.config.variance_type == "fixed_large"
    assert scheduler.config.beta_schedule == "linear"


def test_export_picks_requested_weights(tmp_path):
    diffusers = import_diffusers()
    model, ema = UNet(PRESETS["tiny"]), UNet(PRESETS["tiny"])
    randomize_weights(model, seed=1)
    randomize_weights(ema, seed=2)
    save_model(tmp_path / "trained.safetensors", model, DiffusionConfig(), ema=ema)

    for weights, expected in (("ema", ema), ("model", model)):
        out_dir = tmp_path / weights
        unet.export(tmp_path / "trained.safetensors", out_dir, weights=weights)
        reloaded = diffusers.UNet2DModel.from_pretrained(out_dir).eval()
        assert max_output_difference(reloaded, expected, size=32) < EQUIVALENCE_TOLERANCE, weights


def test_export_refuses_to_overwrite(tmp_path):
    model = UNet(PRESETS["tiny"])
    save_model(tmp_path / "model.safetensors", model, DiffusionConfig())
    unet.export(tmp_path / "model.safetensors", tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        unet.export(tmp_path / "model.safetensors", tmp_path / "out")


# --------------------------------------------------------------------------- conversion errors


def test_conversion_mismatch_names_keys(tmp_path):
    reference = diffusers_unet(PRESETS["tiny"], seed=3)
    folder = save_diffusers_dir(reference, tmp_path / "tiny")
    state = dict(reference.state_dict())
    del state["conv_in.bias"]
    state["mid_block.extra.weight"] = torch.zeros(3)
    state["conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))

    with pytest.raises(ValueError) as error:
        unet.convert(folder, tmp_path / "out.safetensors")
    message = str(error.value)
    assert "missing keys (1): conv_in.bias" in message
    assert "unexpected keys (1): mid_block.extra.weight" in message
    assert "misshapen keys (1): conv_out.weight (3, 32, 1, 1) (expected (3, 32, 3, 3))" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_conversion_requires_scheduler_config(tmp_path):
    reference = diffusers_unet(PRESETS["tiny"], seed=4)
    reference.save_pretrained(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="--scheduler-config"):
        unet.convert(tmp_path / "tiny", tmp_path / "out.safetensors")


def test_conversion_refuses_to_overwrite(tmp_path):
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        unet.convert(tmp_path / "missing", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"


def test_safetensors_check_rejects_truncation(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(100)}, str(path))
    unet.check_safetensors_file(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="download again"):
        unet.check_safetensors_file(path)


# --------------------------------------------------------------------------- fetching


@pytest.fixture
def without_proxy(monkeypatch):
    """Unset proxy variables so that urllib connects to 127.0.0.1 directly."""
    for name in (
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub_server(tmp_path, monkeypatch, without_proxy):
    """Serve tmp_path/hub on 127.0.0.1 as the hub endpoint and yield that directory."""
    root = tmp_path / "hub"
    root.mkdir()

    class HubHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

        def send_header(self, keyword, value):
            # "<file>.content-length" overrides the header, to simulate a dropped connection.
            override = Path(self.translate_path(self.path) + ".content-length")
            if keyword == "Content-Length" and override.is_file():
                value = override.read_text()
            super().send_header(keyword, value)

    handler = functools.partial(HubHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_over_loopback_converts_once(hub_server, tmp_path):
    reference = diffusers_unet(PRESETS["tiny"], seed=5)
    save_diffusers_dir(reference, hub_server / "google/ddpm-cifar10-32/resolve/main")

    path = unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    ours, diffusion_config = load_model(path)
    assert path == tmp_path / "cache" / "google--ddpm-cifar10-32.safetensors"
    assert diffusion_config.variance_type == "fixed_large"
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE

    # The cached file is returned without contacting the server.
    mtime = path.stat().st_mtime_ns
    (hub_server / "google").rename(hub_server / "gone")
    assert unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == mtime


def test_fetch_falls_back_to_subfolders(hub_server, tmp_path):
    reference = diffusers_unet(replace(PRESETS["tiny"], sample_size=64), seed=6)
    served = hub_server / "google/ddpm-celebahq-256/resolve/main"
    save_diffusers_dir(reference, served / "unet", variance_type="fixed_small")
    (served / "scheduler").mkdir()
    (served / "unet/scheduler_config.json").rename(served / "scheduler/scheduler_config.json")

    path = unet.pretrained_path("celebahq", cache_dir=tmp_path / "cache")
    ours, diffusion_config = load_model(path)
    assert diffusion_config.variance_type == "fixed_small"
    assert max_output_difference(reference, ours, size=32) < EQUIVALENCE_TOLERANCE


def test_fetch_uses_env_cache_dir(hub_server, tmp_path, monkeypatch):
    save_diffusers_dir(
        diffusers_unet(PRESETS["tiny"], seed=7), hub_server / "google/ddpm-cifar10-32/resolve/main"
    )
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "env_cache"))
    path = unet.pretrained_path("cifar10")
    assert path == tmp_path / "env_cache" / "google--ddpm-cifar10-32.safetensors"


def test_fetch_rejects_corrupt_weights(hub_server, tmp_path):
    served = hub_server / "google/ddpm-cifar10-32/resolve/main"
    save_diffusers_dir(diffusers_unet(PRESETS["tiny"], seed=8), served)
    weights = served / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    folder = tmp_path / "cache" / "downloads" / "google--ddpm-cifar10-32"

    with pytest.raises(ValueError, match="not a complete safetensors file"):
        unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert not (tmp_path / "cache" / "google--ddpm-cifar10-32.safetensors").exists()


def test_fetch_rejects_short_download(hub_server, tmp_path):
    served = hub_server / "google/ddpm-cifar10-32/resolve/main"
    save_diffusers_dir(diffusers_unet(PRESETS["tiny"], seed=9), served)
    weights = served / "diffusion_pytorch_model.safetensors"
    Path(f"{weights}.content-length").write_text(str(weights.stat().st_size + 100))
    folder = tmp_path / "cache" / "downloads" / "google--ddpm-cifar10-32"

    with pytest.raises(OSError, match="stopped at"):
        unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_cli_error_exits_with_message(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        unet.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out.safetensors")])
    assert "error:" in str(exit_info.value.code)
    assert "not found" in str(exit_info.value.code)


def test_fetch_offline_names_files_and_flags(tmp_path, monkeypatch, without_proxy):
    # A port that was just free refuses connections, like a machine without network.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    with pytest.raises(ConnectionError) as error:
        unet.pretrained_path("cifar10", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "config.json" in message
    assert "diffusion_pytorch_model.safetensors" in message
    assert "scheduler_config.json" in message
    assert str(tmp_path / "cache" / "downloads" / "google--ddpm-cifar10-32") in message
    assert "python unet.py convert SRC DST" in message
    assert "--teacher PATH" in message
    assert "--base PATH" in message


def test_fetch_rejects_unknown_dataset():
    with pytest.raises(ValueError, match="mnist"):
        unet.pretrained_path("mnist")
