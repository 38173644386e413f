import functools
import hashlib
import http.server
import math
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
from checkpoint import save_model
from data import load_dataset
from diffusion import Diffusion, DiffusionConfig
from unet import PRESETS, UNet

REPO = Path(__file__).resolve().parent


def require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ImportError(
            f"{module} is a test-only oracle: pip install -r requirements-test.txt"
        ) from error


def data_root() -> Path:
    """Return $DDPM_DATA. Skip when it is unset, and fail when it names no folder."""
    value = os.environ.get("DDPM_DATA")
    if not value:
        pytest.skip("DDPM_DATA is not set; set it to the data folder to run real-image tests")
    root = Path(value)
    assert root.is_dir(), f"DDPM_DATA={value} is not a folder"
    return root


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Keep every cache of a test in its tmp folder, and never reach the real download URL."""
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(metrics, "INCEPTION_URL", "http://127.0.0.1:9/unreachable.pth")


def random_inception_state(seed: int) -> dict[str, torch.Tensor]:
    """Random FID Inception weights that keep activations at order 1 through all layers.

    Default initialization shrinks the pool3 features to about 1e-8, where a relative
    comparison means nothing, so convolutions get He-scaled weights and batch norms unit-order
    statistics.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in metrics.FIDInceptionV3().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = tensor
        elif name.endswith("conv.weight") or name == "fc.weight":
            fan_in = tensor[0].numel()
            state[name] = torch.randn(tensor.shape, generator=generator) * math.sqrt(2 / fan_in)
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = 0.8 + 0.4 * torch.rand(tensor.shape, generator=generator)
        else:
            state[name] = 0.2 * torch.rand(tensor.shape, generator=generator) - 0.1
    return state


def pytorch_fid_networks(state: dict[str, torch.Tensor]):
    """Build pytorch-fid's InceptionV3 (pool3) and its full FID Inception from `state`.

    pytorch-fid fetches its weights with load_state_dict_from_url and loads them strictly, so
    replacing that function loads `state` instead and checks its names against pytorch-fid's.
    """
    inception_module = require("pytorch_fid.inception")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: state)
        pool3_network = inception_module.InceptionV3([3]).eval()
        full_network = inception_module.fid_inception_v3().eval()
    return pool3_network, full_network


@pytest.fixture(scope="module")
def networks():
    state = random_inception_state(seed=0)
    ours = metrics.FIDInceptionV3()
    ours.load_state_dict(state)
    pool3_network, full_network = pytorch_fid_networks(state)
    return ours.eval(), pool3_network, full_network, state


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def gaussian_features(count, mean, std, seed):
    rng = np.random.default_rng(seed)
    return mean + std * rng.standard_normal((count, len(mean)))


def random_covariance(dims: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factor = rng.standard_normal((dims, 2 * dims))
    return factor @ factor.T / (2 * dims)


# ---------------------------------------------------------------- Inception network


def test_inception_names_equal_pytorch_fid(networks):
    ours, _, full_network, _ = networks
    their_names = set(full_network.state_dict())
    our_names = set(ours.state_dict())
    assert our_names == their_names
    assert ours.state_dict()["fc.weight"].shape == (1008, 2048)
    assert ours.state_dict()["fc.bias"].shape == (1008,)


@pytest.mark.parametrize("size", [32, 256])
def test_inception_matches_pytorch_fid(networks, size):
    ours, pool3_network, full_network, _ = networks
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        features, logits = ours(images)
        expected_features = pool3_network(images)[0].flatten(1)
        # torchvision's classifier head with its bias taken out again.
        expected_logits = full_network.fc(expected_features) - full_network.fc.bias
    assert features.shape == (2, 2048)
    assert logits.shape == (2, 1008)
    assert expected_features.abs().mean() > 0.01  # random weights keep features at order 1
    assert relative_error(features, expected_features) < 1e-4
    assert relative_error(logits, expected_logits) < 1e-4


def test_inception_state_errors_name_tensors(networks, tmp_path):
    *_, state = networks
    missing = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.conv.weight"}
    with pytest.raises(ValueError, match="1 missing tensors.*Mixed_7c.branch_pool.conv.weight"):
        metrics.check_inception_state(missing, tmp_path / "w.pth")

    unexpected = {**state, "AuxLogits.fc.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="1 unexpected tensors.*AuxLogits.fc.weight"):
        metrics.check_inception_state(unexpected, tmp_path / "w.pth")

    misshapen = {**state, "fc.weight": torch.zeros(1000, 2048)}
    with pytest.raises(ValueError, match=r"wrong shape.*fc.weight \(1000, 2048\)"):
        metrics.check_inception_state(misshapen, tmp_path / "w.pth")


def test_pth_converts_to_cached_safetensors(networks, tmp_path, capsys):
    ours, *_, state = networks
    pth = tmp_path / "random_inception.pth"
    torch.save(state, pth)
    sha256 = hashlib.sha256(pth.read_bytes()).hexdigest()

    network, weights_sha256 = metrics.load_inception(pth)
    converted = metrics.converted_path(sha256)
    assert weights_sha256 == sha256
    assert converted.is_file()
    assert "not comparable with published numbers" in capsys.readouterr().err

    # The converted file loads by itself, records the .pth's hash and gives the same network.
    reloaded, reloaded_sha256 = metrics.load_inception(converted)
    assert reloaded_sha256 == sha256
    for name, tensor in ours.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(reloaded.state_dict()[name], tensor), name
            assert torch.equal(network.state_dict()[name], tensor), name


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """Serve tmp_path/served over HTTP on 127.0.0.1 and return the base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_keeps_only_matching_hash(loopback_server, tmp_path):
    url, served = loopback_server
    payload = os.urandom(3 << 20)
    (served / "weights.pth").write_bytes(payload)
    sha256 = hashlib.sha256(payload).hexdigest()

    destination = tmp_path / "downloads" / "weights.pth"
    metrics.download_inception_weights(f"{url}/weights.pth", destination, sha256)
    assert destination.read_bytes() == payload

    rejected = tmp_path / "downloads" / "rejected.pth"
    with pytest.raises(ValueError, match="sha256"):
        metrics.download_inception_weights(f"{url}/weights.pth", rejected, "0" * 64)
    assert not rejected.exists()
    assert sorted(p.name for p in rejected.parent.iterdir()) == ["weights.pth"]


def test_official_weights_rejected_on_hash_mismatch(loopback_server):
    url, served = loopback_server
    (served / "pt_inception.pth").write_bytes(b"not the published weights")
    with pytest.raises(ValueError, match=metrics.INCEPTION_SHA256):
        metrics.resolve_inception_weights(url=f"{url}/pt_inception.pth")
    assert not any(metrics.inception_cache_dir().glob("*.pth"))


def test_offline_error_names_file_and_flag():
    with pytest.raises(metrics.InceptionWeightsNotFound) as error:
        metrics.resolve_inception_weights(url="http://127.0.0.1:9/pt_inception.pth")
    message = str(error.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert str(metrics.inception_cache_dir()) in message
    assert "--inception PATH" in message


def test_local_official_file_checked_by_hash():
    local = metrics.inception_cache_dir() / metrics.INCEPTION_FILENAMES[0]
    local.parent.mkdir(parents=True)
    local.write_bytes(b"truncated download")
    with pytest.raises(ValueError, match="damaged"):
        metrics.resolve_inception_weights()


# ---------------------------------------------------------------- FID


def test_fid_of_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    var1, var2 = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    fid = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert fid == pytest.approx(expected, rel=1e-10)


def test_fid_of_shifted_gaussian_is_shift():
    cov = random_covariance(32, seed=1)
    mu = np.zeros(32)
    shift = np.full(32, 0.25)
    fid = metrics.frechet_distance(mu, cov, mu + shift, cov)
    assert fid == pytest.approx(32 * 0.25**2, rel=1e-8)


def test_fid_of_sampled_features_near_closed_form():
    mean1, mean2 = np.zeros(8), np.full(8, 0.5)
    std1, std2 = np.ones(8), np.full(8, 2.0)
    mu1, cov1 = metrics.fid_statistics(gaussian_features(100_000, mean1, std1, seed=0))
    mu2, cov2 = metrics.fid_statistics(gaussian_features(100_000, mean2, std2, seed=1))
    expected = 8 * 0.5**2 + 8 * (1.0 - 2.0) ** 2
    assert metrics.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=0.02)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fid_equals_pytorch_fid_full_rank():
    fid_score = require("pytorch_fid.fid_score")
    mu1, cov1 = metrics.fid_statistics(gaussian_features(500, np.zeros(64), np.ones(64), 0))
    mu2, cov2 = metrics.fid_statistics(gaussian_features(500, np.full(64, 0.1), 1.3, 1))
    ours = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    theirs = fid_score.calculate_frechet_distance(mu1, cov1, mu2, cov2)
    assert abs(ours - theirs) < 1e-6


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fid_equals_pytorch_fid_singular(capsys):
    fid_score = require("pytorch_fid.fid_score")
    mu1, cov1 = metrics.fid_statistics(gaussian_features(30, np.zeros(64), np.ones(64), 0))
    mu2, cov2 = metrics.fid_statistics(gaussian_features(30, np.full(64, 0.1), 1.3, 1))
    ours = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    theirs = fid_score.calculate_frechet_distance(mu1, cov1, mu2, cov2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fid_few_samples_finite_with_warning(capsys):
    features1 = gaussian_features(16, np.zeros(64), np.ones(64), seed=0)
    features2 = gaussian_features(16, np.ones(64), np.ones(64), seed=1)
    mu1, cov1 = metrics.fid_statistics(features1)
    mu2, cov2 = metrics.fid_statistics(features2)
    fid = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    assert np.isfinite(fid)
    assert fid > 0
    assert "fewer than the 64 feature dimensions" in capsys.readouterr().err


def test_fid_rejects_invalid_covariance():
    cov = random_covariance(8, seed=0)
    not_psd = cov - 2 * np.eye(8)
    with pytest.raises(ValueError, match="negative eigenvalue"):
        metrics.frechet_distance(np.zeros(8), not_psd, np.zeros(8), cov)
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(8), cov, np.zeros(7), cov[:7, :7])


# ---------------------------------------------------------------- Inception Score


def independent_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Inception Score written with torch and explicit loops, for comparison."""
    logits = torch.from_numpy(logits).double()
    count = len(logits)
    scores = []
    for i in range(splits):
        part = logits[i * count // splits : (i + 1) * count // splits]
        p_yx = torch.softmax(part, dim=1)
        p_y = p_yx.mean(dim=0)
        kl_terms = [torch.sum(row * (row.log() - p_y.log())) for row in p_yx]
        scores.append(torch.exp(torch.stack(kl_terms).mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_independent_computation():
    logits = np.random.default_rng(0).standard_normal((205, 1008)) * 3
    mean, std = metrics.inception_score(logits)
    expected_mean, expected_std = independent_inception_score(logits, splits=10)
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)


def test_inception_score_of_confident_classes():
    # Each split contains 5 confident predictions, one per class: IS = 5 exactly in the limit.
    labels = np.tile(np.arange(5), 10)
    logits = np.full((50, 1008), -50.0)
    logits[np.arange(50), labels] = 50.0
    mean, std = metrics.inception_score(logits)
    assert mean == pytest.approx(5.0, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_rejects_too_few_images():
    with pytest.raises(ValueError, match="at least 10 images"):
        metrics.inception_score(np.zeros((9, 1008)))


# ---------------------------------------------------------------- statistics files


def test_stats_file_loads_in_pytorch_fid(tmp_path):
    fid_score = require("pytorch_fid.fid_score")
    mu, cov = np.arange(4.0), random_covariance(4, seed=0)
    path = tmp_path / "stats.npz"
    metrics.save_statistics(path, mu, cov, {"n_images": 123, "weights_sha256": "ab" * 32})
    their_mu, their_sigma = fid_score.compute_statistics_of_path(str(path), None, 1, 4, "cpu")
    assert np.array_equal(their_mu, mu)
    assert np.array_equal(their_sigma, cov)

    _, _, record = metrics.load_statistics(path)
    assert record == {"n_images": 123, "weights_sha256": "ab" * 32}


def test_pytorch_fid_stats_file_loads_here(tmp_path):
    mu, cov = np.arange(4.0), random_covariance(4, seed=0)
    path = tmp_path / "pytorch_fid_stats.npz"
    np.savez_compressed(path, mu=mu, sigma=cov)  # the format of pytorch-fid's --save-stats
    loaded_mu, loaded_cov, record = metrics.load_statistics(path)
    assert np.array_equal(loaded_mu, mu)
    assert np.array_equal(loaded_cov, cov)
    assert record == {}


def test_fid_command_on_two_stats_files(tmp_path, capsys):
    cov = random_covariance(8, seed=0)
    metrics.save_statistics(tmp_path / "a.npz", np.zeros(8), cov, {"n_images": 10})
    metrics.save_statistics(tmp_path / "b.npz", np.full(8, 0.5), cov, {"n_images": 20})
    metrics.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    output = capsys.readouterr().out
    assert float(re.search(r"FID (\S+)", output).group(1)) == pytest.approx(8 * 0.25, rel=1e-5)
    assert "images 10 and 20" in output


# ---------------------------------------------------------------- sample generation


class TinyEpsModel(torch.nn.Module):
    """A small random convolution standing in for the UNet: eps_pred = conv(x_t) * t / T."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.1, generator=torch.Generator().manual_seed(0))

    def forward(self, x_t, t):
        return self.conv(x_t) * (t.float().view(-1, 1, 1, 1) / 1000)


class CountingModel(torch.nn.Module):
    """Count the network calls of `inner` and raise KeyboardInterrupt after `fail_after` calls."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.fail_after = None

    def forward(self, x_t, t):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return self.inner(x_t, t)


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(PRESETS["tiny"]).eval()


SAMPLE_SETTINGS = dict(n_samples=10, image_size=8, steps=4, sampler="ancestral", seed=3)


def read_shards(sample_dir: Path) -> torch.Tensor:
    return torch.cat(list(metrics.sample_shard_batches(sample_dir)))


@pytest.mark.slow
def test_killed_sampling_resumes_identically(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = CountingModel(tiny_unet())
    settings = {**SAMPLE_SETTINGS, "n_samples": 5, "image_size": 32, "steps": 2}
    metrics.generate_samples(model, diffusion, tmp_path / "full", batch_size=2, **settings)
    expected = read_shards(tmp_path / "full")

    # Kill in the middle of the second shard: 2 sampler steps per shard.
    model.calls, model.fail_after = 0, 3
    with pytest.raises(KeyboardInterrupt):
        metrics.generate_samples(model, diffusion, tmp_path / "killed", batch_size=2, **settings)
    saved = sorted(p.name for p in (tmp_path / "killed").glob("shard_*.npz"))
    assert saved == ["shard_000000.npz"]

    # The resumed run makes only the two missing shards.
    model.calls, model.fail_after = 0, None
    metrics.generate_samples(model, diffusion, tmp_path / "killed", batch_size=2, **settings)
    assert model.calls == 2 * 2
    resumed = read_shards(tmp_path / "killed")
    assert resumed.shape == (5, 3, 32, 32)
    assert torch.equal(resumed, expected)


def test_deleted_shard_is_made_again(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = CountingModel(TinyEpsModel())
    sample_dir = tmp_path / "samples"
    metrics.generate_samples(model, diffusion, sample_dir, batch_size=4, **SAMPLE_SETTINGS)
    expected = read_shards(sample_dir)

    metrics.shard_path(sample_dir, 2).unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of 3 shards"):
        read_shards(sample_dir)
    model.calls = 0
    metrics.generate_samples(model, diffusion, sample_dir, batch_size=4, **SAMPLE_SETTINGS)
    assert model.calls == 4
    assert torch.equal(read_shards(sample_dir), expected)


def test_shards_independent_of_worker_split(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = TinyEpsModel()
    metrics.generate_samples(model, diffusion, tmp_path / "one", batch_size=4, **SAMPLE_SETTINGS)
    for worker in [(1, 2), (0, 2)]:
        metrics.generate_samples(
            model, diffusion, tmp_path / "two", batch_size=4, worker=worker, **SAMPLE_SETTINGS
        )
    assert torch.equal(read_shards(tmp_path / "two"), read_shards(tmp_path / "one"))


def test_sampling_settings_mismatch_rejected(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    model = TinyEpsModel()
    metrics.generate_samples(model, diffusion, tmp_path, batch_size=4, **SAMPLE_SETTINGS)
    with pytest.raises(ValueError, match="seed=3.*seed=4"):
        metrics.generate_samples(
            model, diffusion, tmp_path, batch_size=4, **{**SAMPLE_SETTINGS, "seed": 4}
        )
    other_model = TinyEpsModel()
    with torch.no_grad():
        other_model.conv.weight.add_(0.01)
    with pytest.raises(ValueError, match="model_sha256"):
        metrics.generate_samples(other_model, diffusion, tmp_path, batch_size=4, **SAMPLE_SETTINGS)


def test_nearby_seeds_share_no_shard_noise():
    seeds = {metrics.shard_seed(seed, shard) for seed in range(20) for shard in range(50)}
    assert len(seeds) == 20 * 50


# ---------------------------------------------------------------- evaluation protocol


def write_cifar_batch(folder: Path, images: np.ndarray) -> None:
    """Write uint8 images (N, 3, 32, 32) as a CIFAR-10 python training batch."""
    folder.mkdir(parents=True)
    content = {b"data": images.reshape(len(images), -1), b"labels": [0] * len(images)}
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(content, f, protocol=2)


def test_evaluate_without_weights_reports_reason(tmp_path):
    diffusion = Diffusion(DiffusionConfig())
    result = metrics.evaluate(
        TinyEpsModel(),
        diffusion,
        dataset="cifar10",
        data_root=tmp_path / "unused",
        steps=2,
        sampler="ddim",
        n_samples=4,
        seed=0,
        out_dir=tmp_path / "eval",
        batch_size=4,
    )
    assert result["fid"] is None
    assert result["is_mean"] is None
    assert "--inception PATH" in result["not_computed"]
    assert result["sampler"] == "ddim"
    assert result["steps"] == 2
    assert len(read_shards(tmp_path / "eval" / "samples")) == 4
    assert metrics.format_protocol(result).startswith("FID and IS not computed")


@pytest.mark.slow
def test_evaluate_reports_scores_and_protocol(networks, tmp_path):
    *_, state = networks
    weights = tmp_path / "random_inception.pth"
    torch.save(state, weights)
    rng = np.random.default_rng(0)
    write_cifar_batch(tmp_path / "cifar", rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8))

    result = metrics.evaluate(
        TinyEpsModel(),
        Diffusion(DiffusionConfig()),
        dataset="cifar10",
        data_root=tmp_path / "cifar",
        steps=2,
        sampler="ddim",
        n_samples=10,
        seed=0,
        out_dir=tmp_path / "eval",
        inception=weights,
        batch_size=5,
    )
    assert np.isfinite(result["fid"])
    assert result["fid"] > 0
    assert result["is_mean"] >= 1.0
    assert result["reference"] == {"dataset": "cifar10", "split": "train", "n_images": 12}
    assert result["inception_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result["n_samples"] == 10
    line = metrics.format_protocol(result)
    assert "10 samples, ddim 2 steps, seed 0" in line
    assert "vs 12 cifar10 train images" in line

    # The reference statistics are cached, and the stats command writes the cached values.
    cached = list((metrics.cache_dir() / "fid_stats").glob("cifar10-train-12-bilinear299-*.npz"))
    assert len(cached) == 1
    out = tmp_path / "reference.npz"
    command = ["stats", "--dataset", "cifar10", "--data", str(tmp_path / "cifar")]
    metrics.main(command + ["--out", str(out), "--inception", str(weights), "--device", "cpu"])
    mu, cov, record = metrics.load_statistics(out)
    cached_mu, cached_cov, _ = metrics.load_statistics(cached[0])
    assert np.array_equal(mu, cached_mu)
    assert np.array_equal(cov, cached_cov)
    assert record["n_images"] == 12
    assert record["weights_sha256"] == result["inception_sha256"]


# ---------------------------------------------------------------- real images


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_fid_command_matches_pytorch_fid_on_cifar(networks, tmp_path):
    """Compare `python metrics.py fid` with pytorch-fid's pipeline on real CIFAR-10 PNGs.

    pytorch-fid reads the folders and computes the statistics with its own network, loaded
    with the same random weights. Its statistics go through our frechet_distance, because its
    scipy.linalg.sqrtm takes minutes at 2048 dimensions on two cores. The FID tests above check
    frechet_distance against pytorch-fid's calculate_frechet_distance.
    """
    fid_score = require("pytorch_fid.fid_score")
    images, _ = load_dataset("cifar10", data_root(), split="test")
    write_pngs(images[:12], tmp_path / "a")
    write_pngs(images[12:24], tmp_path / "b")
    *_, state = networks
    weights = tmp_path / "random_inception.pth"
    torch.save(state, weights)

    command = [sys.executable, str(REPO / "metrics.py"), "fid", str(tmp_path / "a")]
    command += [str(tmp_path / "b"), "--inception", str(weights), "--device", "cpu"]
    command += ["--batch-size", "6"]
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=os.environ)
    assert output.returncode == 0, output.stderr
    ours = float(re.search(r"FID (\S+)", output.stdout).group(1))

    pool3_network, _ = pytorch_fid_networks(state)
    statistics = [
        fid_score.compute_statistics_of_path(str(tmp_path / name), pool3_network, 6, 2048, "cpu", 0)
        for name in ("a", "b")
    ]
    expected = metrics.frechet_distance(*statistics[0], *statistics[1])
    assert expected > 0
    assert ours == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- command line


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[Path, DiffusionConfig]:
    """Save a random tiny UNet with a 20-step schedule, which keeps the NLL cheap."""
    config = DiffusionConfig(T=20, beta_start=1e-3, beta_end=0.2)
    path = tmp_path / "tiny.safetensors"
    save_model(path, tiny_unet(), config)
    return path, config


@pytest.mark.slow
def test_sample_then_is_commands(networks, tiny_checkpoint, tmp_path, capsys):
    checkpoint, _ = tiny_checkpoint
    *_, state = networks
    weights = tmp_path / "random_inception.pth"
    torch.save(state, weights)

    sample = ["sample", "--checkpoint", str(checkpoint), "--dataset", "cifar10"]
    sample += ["--out-dir", str(tmp_path / "run"), "--fid-samples", "10", "--steps", "2"]
    sample += ["--batch-size", "5", "--device", "cpu"]
    metrics.main(sample)
    sample_dir = tmp_path / "run" / "samples"
    assert len(read_shards(sample_dir)) == 10
    assert (tmp_path / "run" / "config.json").is_file()

    metrics.main(["is", str(sample_dir), "--inception", str(weights), "--device", "cpu"])
    output = capsys.readouterr().out
    assert re.search(r"IS \S+ ± \S+ \| 10 splits \| 10 samples in ", output)


def test_nll_command_reports_bits_and_nats(tiny_checkpoint, capsys):
    checkpoint, config = tiny_checkpoint
    root = data_root()
    command = ["nll", "--checkpoint", str(checkpoint), "--dataset", "cifar10"]
    command += ["--data", str(root), "--n-images", "2", "--batch-size", "2", "--device", "cpu"]
    metrics.main(command)
    output = capsys.readouterr().out
    pattern = r"\| (\S+) ± (\S+) bits/dim \| (\S+) ± (\S+) nats/image \| 2 images"
    match = re.search(pattern, output)
    assert match, output

    # The same numbers from nll_statistics, and nats = bits/dim * 3072 * ln 2.
    images, _ = load_dataset("cifar10", root, split="test")
    model = tiny_unet()
    expected = metrics.nll_statistics(model, Diffusion(config), images[:2], batch_size=2, seed=0)
    assert float(match.group(1)) == pytest.approx(expected["bpd_mean"], abs=1e-4)
    assert float(match.group(3).replace(",", "")) == pytest.approx(expected["nats_mean"], abs=0.1)
    assert expected["nats_mean"] == pytest.approx(expected["bpd_mean"] * 3072 * math.log(2))
