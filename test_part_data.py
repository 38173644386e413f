"""Tests for data.py: safe pickle loading, real-data counts, keep/forget splits and batches."""

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

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


class RunsShellCommand:
    """Pickles to a call of os.system, which runs when the pickle is loaded."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_batch(path: Path, content, protocol: int = 2) -> Path:
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=protocol)
    return path


def valid_batch(count: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {
        b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        b"labels": [i % 10 for i in range(count)],
    }


def link_celebahq(source: Path, target: Path, attribute_file: str) -> Path:
    """Build a CelebA-HQ folder that shares the real images but has only one attribute file."""
    target.mkdir()
    (target / "images").symlink_to(source / "images")
    (target / attribute_file).symlink_to(source / attribute_file)
    return target


# ---------------------------------------------------------------------------- safe pickles


def test_unpickler_rejects_code_running_pickle(tmp_path):
    marker = tmp_path / "marker"
    path = write_batch(tmp_path / "data_batch_1", RunsShellCommand(f"touch {marker}"))
    with pytest.raises(ValueError) as error:
        data.load_pickle(path)
    assert str(path) in str(error.value)
    assert "rejected" in str(error.value)
    assert "system" in str(error.value)
    assert not marker.exists()


def test_code_running_pickle_is_live(tmp_path):
    # The payload of the rejection test does run under the standard unpickler.
    marker = tmp_path / "marker"
    payload = pickle.dumps(RunsShellCommand(f"touch {marker}"), protocol=2)
    pickle.loads(payload)
    assert marker.exists()


def test_cifar_loader_rejects_code_pickle(tmp_path):
    marker = tmp_path / "marker"
    write_batch(tmp_path / "test_batch", {b"data": RunsShellCommand(f"touch {marker}")})
    with pytest.raises(ValueError, match="test_batch"):
        data.load_cifar10(tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_unpickler_reads_numpy_batches(tmp_path, protocol):
    batch = valid_batch()
    path = write_batch(tmp_path / "test_batch", batch, protocol)
    content = data.load_pickle(path)
    assert np.array_equal(content["data"], batch[b"data"])
    assert content["labels"] == batch[b"labels"]


def test_truncated_pickle_names_file(tmp_path):
    path = write_batch(tmp_path / "test_batch", valid_batch())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="invalid pickle") as error:
        data.load_pickle(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------- CIFAR-10 checks


@pytest.mark.parametrize(
    "content, message",
    [
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
        ({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, r"\(N, 3072\)"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "4 integers"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "outside 0 to 9"),
        ({b"labels": [0] * 4}, "'data' and 'labels'"),
        ([1, 2, 3], "'data' and 'labels'"),
    ],
)
def test_cifar_batch_validation_errors(tmp_path, content, message):
    path = write_batch(tmp_path / "test_batch", content)
    with pytest.raises(ValueError, match=message) as error:
        data.read_cifar10_batch(path)
    assert str(path) in str(error.value)
    assert "official python version" in str(error.value)


def test_cifar_pixel_layout_is_planar(tmp_path):
    batch = valid_batch(2)
    write_batch(tmp_path / "test_batch", batch)
    images, labels, _ = data.load_cifar10(tmp_path, "test")
    pixels = batch[b"data"][1]
    assert images.shape == (2, 3, 32, 32)
    assert images[1, 0, 0, 1] == pixels[1]
    assert images[1, 1, 0, 0] == pixels[1024]
    assert images[1, 2, 1, 0] == pixels[2048 + 32]
    assert labels.tolist() == [0, 1]


def test_cifar_missing_batches_error(tmp_path):
    write_batch(tmp_path / "test_batch", valid_batch())
    with pytest.raises(FileNotFoundError, match="data_batch_1 to data_batch_5"):
        data.load_cifar10(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        data.load_cifar10(tmp_path / "elsewhere", "test")


def test_cifar_offline_error_names_data(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data, "CIFAR10", offline)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        data.load_cifar10(None, "train")
    assert "--data" in str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)


# ---------------------------------------------------------------------------- real data


def test_cifar_real_train_and_test(data_root):
    train, train_labels, class_names = data.load_cifar10(data_root, "train")
    test, test_labels, _ = data.load_cifar10(data_root, "test")
    assert class_names == list(data.CIFAR10_CLASSES)
    assert train.shape == (10_000, 3, 32, 32)
    assert train.dtype == torch.uint8
    assert test.shape == (1_000, 3, 32, 32)
    assert len(train_labels) == 10_000
    assert len(test_labels) == 1_000


def test_cifar_real_airplane_counts(data_root):
    _, train_masks = data.load_dataset("cifar10", data_root, "train")
    _, test_masks = data.load_dataset("cifar10", data_root, "test")
    assert int(data.forget_mask(train_masks, "airplane").sum()) == 1_000
    assert int(data.forget_mask(test_masks, "airplane").sum()) == 103


def test_cifar_real_split_sizes(data_root):
    images, masks = data.load_dataset("cifar10", data_root, "test")
    keep, forget = data.split_keep_forget(images, masks, data.DEFAULT_FORGET["cifar10"])
    assert len(forget) == 103
    assert len(keep) == 897


def test_cifar_unknown_class_lists_names(data_root):
    _, masks = data.load_dataset("cifar10", data_root, "test")
    with pytest.raises(ValueError, match="unknown class or attribute 'plane'") as error:
        data.forget_mask(masks, "plane")
    for name in data.CIFAR10_CLASSES:
        assert name in str(error.value)


def test_celebahq_csv_smiling_count(data_root, tmp_path):
    folder = link_celebahq(data_root / "celebahq256", tmp_path / "csv", data.CELEBAHQ_CSV_FILE)
    paths = data.list_celebahq_images(folder)
    _, names, table = data.read_celebahq_attributes(folder)
    test, attributes = data.load_celebahq(folder, size=16, split="test")
    assert names == ["Smiling"]
    assert len(paths) == 2_000
    assert sum(table[path.name][0] for path in paths) == 1_000
    assert test.shape == (200, 3, 16, 16)
    assert list(attributes) == ["Smiling"]
    assert attributes["Smiling"].tolist() == [table[p.name][0] for p in paths[1_800:]]


def test_celebahq_anno_matches_csv(data_root, tmp_path):
    source = data_root / "celebahq256"
    csv_folder = link_celebahq(source, tmp_path / "csv", data.CELEBAHQ_CSV_FILE)
    anno_folder = link_celebahq(source, tmp_path / "anno", data.CELEBAHQ_ANNO_FILE)
    images = data.list_celebahq_images(csv_folder)
    _, _, csv_table = data.read_celebahq_attributes(csv_folder)
    _, names, anno_table = data.read_celebahq_attributes(anno_folder)
    smiling = names.index("Smiling")
    csv_smiling = [csv_table[path.name][0] for path in images]
    anno_smiling = [anno_table[path.name][smiling] for path in images]
    assert len(names) == 40
    assert len(anno_table) == 30_000
    assert sum(anno_smiling) == 1_000
    assert anno_smiling == csv_smiling


def test_celebahq_real_test_split(data_root):
    folder = data_root / "celebahq256"
    paths = data.list_celebahq_images(folder)
    _, names, table = data.read_celebahq_attributes(folder)
    test, attributes = data.load_dataset("celebahq", data_root, "test", size=32)
    held_out = paths[1_800:]
    smiling = names.index("Smiling")
    assert len(paths) == 2_000
    assert data.split_celebahq_paths(paths, "train") == paths[:1_800]
    assert data.split_celebahq_paths(paths, "test") == held_out
    assert test.shape == (200, 3, 32, 32)
    assert len(attributes) == 40
    assert attributes["Smiling"].tolist() == [table[p.name][smiling] for p in held_out]


def test_celebahq_unknown_attribute_lists_names(data_root, tmp_path):
    masks = {"Smiling": torch.tensor([True, False])}
    with pytest.raises(ValueError, match="valid names: Smiling"):
        data.forget_mask(masks, "Happy")
    _, names, _ = data.read_celebahq_attributes(data_root / "celebahq256")
    anno_masks = {name: torch.tensor([True, False]) for name in names}
    with pytest.raises(ValueError) as error:
        data.forget_mask(anno_masks, "Happy")
    assert "Eyeglasses" in str(error.value)
    assert "Wearing_Hat" in str(error.value)


# ---------------------------------------------------------------------------- CelebA-HQ files


def write_image_folder(folder: Path, sizes: list[tuple[int, int]], mode: str = "RGB") -> Path:
    """Write images 0.png, 1.png, ... and an attributes.csv with alternating smiling values."""
    (folder / "images").mkdir(parents=True)
    rows = ["image,smiling"]
    for i, (width, height) in enumerate(sizes):
        Image.new(mode, (width, height), color=200 if mode == "L" else None).save(
            folder / "images" / f"{i}.png"
        )
        rows.append(f"{i}.png,{i % 2}")
    (folder / "attributes.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_celebahq_mixed_sizes_rejected(tmp_path):
    folder = write_image_folder(tmp_path, [(8, 8), (8, 8), (6, 6)])
    with pytest.raises(ValueError, match=r"2.png: image is 6x6, but 0.png is 8x8"):
        data.load_celebahq(folder)


def test_celebahq_resize_to_size(tmp_path):
    folder = write_image_folder(tmp_path, [(8, 8), (6, 6)])
    images, _ = data.load_celebahq(folder, size=4)
    assert images.shape == (2, 3, 4, 4)


def test_celebahq_non_square_rejected(tmp_path):
    folder = write_image_folder(tmp_path, [(8, 6)])
    with pytest.raises(ValueError, match="not square|square"):
        data.load_celebahq(folder, size=4)


def test_celebahq_grayscale_becomes_rgb(tmp_path):
    folder = write_image_folder(tmp_path, [(4, 4)], mode="L")
    images, _ = data.load_celebahq(folder)
    assert images.shape == (1, 3, 4, 4)
    assert bool((images == 200).all())


def test_celebahq_missing_row_names_image(tmp_path):
    folder = write_image_folder(tmp_path, [(4, 4), (4, 4)])
    (folder / "attributes.csv").write_text("image,smiling\n0.png,1\n")
    with pytest.raises(ValueError, match=r"1.png: no row in .*attributes.csv"):
        data.load_celebahq(folder)


def test_celebahq_bad_anno_row_named(tmp_path):
    path = tmp_path / data.CELEBAHQ_ANNO_FILE
    path.write_text("2\nSmiling Male\n0.jpg  1 -1\n1.jpg  1 0\n")
    with pytest.raises(ValueError, match="line 4"):
        data.read_anno_file(path)


def test_celebahq_without_root_rejected():
    with pytest.raises(ValueError, match="--data"):
        data.load_dataset("celebahq", None, "train")


# ---------------------------------------------------------------------------- keep and forget


def test_empty_forget_set_rejected():
    masks = {"airplane": torch.zeros(5, dtype=torch.bool), "cat": torch.ones(5, dtype=torch.bool)}
    with pytest.raises(ValueError, match="'airplane' is empty: 0 of 5"):
        data.forget_mask(masks, "airplane")
    with pytest.raises(ValueError, match="keep set is empty: all 5"):
        data.forget_mask(masks, "cat")


def test_forget_name_case_insensitive():
    masks = {"Smiling": torch.tensor([True, False, True])}
    assert data.forget_mask(masks, "smiling").tolist() == [True, False, True]


# ---------------------------------------------------------------------------- batches


def random_images(count: int, size: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_model_range_endpoints():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    x = data.to_model_range(images)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0
    assert x.max().item() == 1.0


def test_batches_in_model_range():
    iterator = data.BatchIterator(random_images(10), batch_size=4, seed=0)
    for _ in range(6):
        batch = next(iterator)
        assert batch.shape == (4, 3, 4, 4)
        assert batch.min().item() >= -1.0
        assert batch.max().item() <= 1.0


def test_flips_deterministic_with_seed():
    images = random_images(64)
    first = next(data.BatchIterator(images, batch_size=64, seed=3))
    second = next(data.BatchIterator(images, batch_size=64, seed=3))
    other = next(data.BatchIterator(images, batch_size=64, seed=4))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_flips_mirror_some_images():
    images = random_images(64)
    iterator = data.BatchIterator(images, batch_size=64, seed=3)
    batch = next(iterator)
    source = data.to_model_range(images[iterator.order])
    flipped = [torch.equal(b, s.flip(-1)) for b, s in zip(batch, source, strict=True)]
    unchanged = [torch.equal(b, s) for b, s in zip(batch, source, strict=True)]
    assert 16 < sum(flipped) < 48
    assert sum(flipped) + sum(unchanged) == 64


def test_no_flip_keeps_images():
    images = random_images(8)
    iterator = data.BatchIterator(images, batch_size=8, seed=3, flip=False)
    batch = next(iterator)
    assert torch.equal(batch, data.to_model_range(images[iterator.order]))


def test_epoch_visits_every_image_once():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    iterator = data.BatchIterator(images, batch_size=3, seed=0, flip=False)
    seen = [int(round((x[0, 0, 0].item() + 1) * 127.5)) for _ in range(3) for x in next(iterator)]
    assert len(set(seen)) == 9
    next(iterator)
    assert iterator.epoch == 1


def test_iterator_resume_matches_uninterrupted():
    images = random_images(10)
    uninterrupted = data.BatchIterator(images, batch_size=4, seed=7)
    expected = [next(uninterrupted) for _ in range(9)]

    interrupted = data.BatchIterator(images, batch_size=4, seed=7)
    for _ in range(4):
        next(interrupted)
    state = interrupted.state_dict()
    resumed = data.BatchIterator(images, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    for step in range(4, 9):
        assert torch.equal(next(resumed), expected[step]), f"batch {step} differs after resume"


def test_iterator_resume_rejects_other_data():
    state = data.BatchIterator(random_images(10), batch_size=4).state_dict()
    other = data.BatchIterator(random_images(12), batch_size=4)
    with pytest.raises(ValueError, match="num_images 10"):
        other.load_state_dict(state)


def test_batch_larger_than_images_rejected():
    with pytest.raises(ValueError, match="only 3 images for a batch size of 4"):
        data.BatchIterator(random_images(3), batch_size=4)


@pytest.mark.parametrize(
    "value, message", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (2.0, "outside")]
)
def test_float_images_checked(value, message):
    images = torch.zeros(4, 3, 2, 2)
    images[1, 2, 0, 1] = value
    with pytest.raises(ValueError, match=message):
        data.BatchIterator(images, batch_size=2)


def test_float_images_pass_through():
    images = torch.linspace(-1, 1, 4 * 3 * 2 * 2).view(4, 3, 2, 2)
    batch = next(data.BatchIterator(images, batch_size=4, flip=False))
    assert torch.equal(batch.sort(dim=0).values, images.sort(dim=0).values)
