"""Load CIFAR-10 and CelebA-HQ, split them into keep and forget sets, and serve minibatches.

Every script loads images through `load_dataset(name, root, split, size)`. It returns uint8 images
(N, 3, H, W) and a dict that maps each class or attribute name to a bool mask over the images.
`split_keep_forget` splits the images by one of those names, and `BatchIterator` serves shuffled,
randomly flipped minibatches in [-1, 1] that resume exactly from `state_dict()`.

CIFAR-10 comes from the official python batches (https://www.cs.toronto.edu/~kriz/cifar.html).
When no folder is given, torchvision downloads them into $DDPM_CACHE or ~/.cache/ddpm-stability.
CelebA-HQ has no download: pass a folder of `<id>.jpg` images together with the CelebAMask-HQ
attribute file or an `attributes.csv` with columns image,smiling.
"""

import csv
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10

from logs import Progress, warn

# ---------------------------------------------------------------------------- constants

DATASETS = ("cifar10", "celebahq")
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DEFAULT_FORGET = {"cifar10": "airplane", "celebahq": "Smiling"}
CIFAR10_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_TRAIN_BATCHES = 5
CIFAR10_IMAGE_SIZE = 32

# Folder names tried below a given root, so that one data folder can hold both datasets.
CIFAR10_SUBFOLDERS = ("cifar-10-batches-py",)
CELEBAHQ_SUBFOLDERS = ("celebahq256", "CelebAMask-HQ")
CELEBAHQ_IMAGE_FOLDERS = ("images", "CelebA-HQ-img")
CELEBAHQ_ANNO_FILE = "CelebAMask-HQ-attribute-anno.txt"
CELEBAHQ_CSV_FILE = "attributes.csv"
CELEBAHQ_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# CelebA-HQ has no official split, so the test split is the last 10% of the images by id.
CELEBAHQ_TEST_PERCENT = 10

# Images resized at a time, which bounds the float32 copy that interpolation needs.
RESIZE_CHUNK = 256


def cache_dir() -> Path:
    """Return the download cache: $DDPM_CACHE, else ~/.cache/ddpm-stability."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm-stability")


# ---------------------------------------------------------------------------- safe pickles

# The globals that a pickled numpy array references. The official CIFAR-10 batches (Python 2,
# protocol 2) use the first four. Python 3 writes array bytes with _codecs.encode at protocol 2
# and with _frombuffer at protocol 5. Any other global could call arbitrary code on load.
PICKLE_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle references a global outside PICKLE_ALLOWED_GLOBALS."""


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_ALLOWED_GLOBALS:
            raise UnsafePickleError(f"{module}.{name}")
        return super().find_class(module, name)


def load_pickle(path: Path):
    """Read a pickle of plain containers and numpy arrays without running any code from it.

    Byte-string dict keys, as in the Python 2 CIFAR-10 files, come back as str.
    """
    try:
        with open(path, "rb") as f:
            content = ArrayUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as error:
        raise ValueError(
            f"{path}: rejected, the pickle references {error}, which could run code on load. "
            f"CIFAR-10 batches contain only lists, byte strings and numpy arrays. Replace the file "
            f"with the official python version from {CIFAR10_PAGE}"
        ) from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(
            f"{path}: invalid pickle ({error}). The file is damaged or truncated. Replace it with "
            f"the official python version from {CIFAR10_PAGE}"
        ) from error
    if isinstance(content, dict):
        content = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}
    return content


# ---------------------------------------------------------------------------- image tensors


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images (N, 3, H, W) to size x size, bilinear with antialiasing."""
    chunks = []
    for chunk in images.split(RESIZE_CHUNK):
        x = F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        chunks.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images to float32 in [-1, 1], the range the UNet is trained on."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise ValueError unless `images` is uint8 or finite float in [-1, 1], shaped (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float in [-1, 1], got {images.dtype}")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(
            f"{name} contain {bad:,} non-finite values (NaN or inf); "
            f"drop or repair those images before training"
        )
    low, high = images.min().item(), images.max().item()
    if low < -1 or high > 1:
        raise ValueError(
            f"{name} range from {low:.4g} to {high:.4g}, outside [-1, 1]; "
            f"convert uint8 images with to_model_range"
        )


# ---------------------------------------------------------------------------- CIFAR-10


def find_cifar10_folder(root: str | Path) -> Path:
    """Return `root` or its cifar-10-batches-py subfolder, whichever contains the python batches."""
    root = Path(root)
    candidates = [root] + [root / name for name in CIFAR10_SUBFOLDERS]
    for folder in candidates:
        if (folder / "test_batch").is_file() or any(folder.glob("data_batch_*")):
            return folder
    raise FileNotFoundError(
        f"no CIFAR-10 python batches (data_batch_1 to data_batch_5, test_batch) in "
        f"{' or '.join(map(str, candidates))}. Pass the folder that contains them, unpacked "
        f"from cifar-10-python.tar.gz ({CIFAR10_PAGE})"
    )


def download_cifar10(cache: Path) -> Path:
    """Download and verify the CIFAR-10 python batches with torchvision into `cache`."""
    folder = cache / CIFAR10_SUBFOLDERS[0]
    try:
        # torchvision skips the download when the files in `cache` pass its md5 check.
        CIFAR10(str(cache), train=True, download=True)
    except (OSError, RuntimeError) as error:
        raise FileNotFoundError(
            f"CIFAR-10 is not in {folder} and the download failed ({error}). Without internet, "
            f"copy the folder cifar-10-batches-py from cifar-10-python.tar.gz ({CIFAR10_PAGE}) "
            f"to this machine and pass it with --data FOLDER"
        ) from error
    return folder


def read_cifar10_class_names(folder: Path) -> list[str]:
    """Return the class names, checked against batches.meta when the folder has one."""
    path = folder / "batches.meta"
    if not path.is_file():
        return list(CIFAR10_CLASSES)
    meta = load_pickle(path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if names is None:
        raise ValueError(f"{path}: no 'label_names' entry; replace it with the official file")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if names != list(CIFAR10_CLASSES):
        raise ValueError(
            f"{path}: label_names {names} differ from CIFAR-10's {list(CIFAR10_CLASSES)}; "
            f"replace it with the official file"
        )
    return names


def describe(value) -> str:
    """Return a short description of a value's type, dtype and shape for error messages."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one python batch and return its pixels (N, 3072) uint8 and labels (N,) int64."""
    fix = f"Replace the file with the official python version from {CIFAR10_PAGE}"
    content = load_pickle(path)
    if not isinstance(content, dict) or "data" not in content or "labels" not in content:
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels'. {fix}")

    # Pixels: one row per image, 1024 red, then 1024 green, then 1024 blue values.
    data = content["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(
            f"{path}: 'data' must be a uint8 array (N, 3072), got {describe(data)}. {fix}"
        )
    if data.shape[1] != 3 * CIFAR10_IMAGE_SIZE**2 or data.shape[0] == 0:
        raise ValueError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}. {fix}")

    # Labels: N class indices 0 to 9.
    labels = np.asarray(content["labels"])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: 'labels' must be {len(data)} integers to match 'data', "
            f"got {describe(labels)}. {fix}"
        )
    if labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES):
        raise ValueError(
            f"{path}: labels range from {labels.min()} to {labels.max()}, outside 0 to 9. {fix}"
        )
    return data, labels.astype(np.int64)


def load_cifar10(
    root: str | Path | None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load CIFAR-10 as uint8 images (N, 3, 32, 32), int64 labels (N,) and the class names.

    The train split is every data_batch_1 to data_batch_5 that the folder has, and a warning names
    the count when batches are missing. With root None the batches are downloaded into cache_dir().
    """
    if split not in ("train", "test"):
        raise ValueError(f"invalid CIFAR-10 split {split!r}; choose 'train' or 'test'")
    folder = download_cifar10(cache_dir()) if root is None else find_cifar10_folder(root)
    class_names = read_cifar10_class_names(folder)

    # Pick the batch files of the split.
    if split == "train":
        names = [f"data_batch_{i}" for i in range(1, CIFAR10_TRAIN_BATCHES + 1)]
        paths = [folder / name for name in names if (folder / name).is_file()]
    else:
        paths = [folder / "test_batch"] if (folder / "test_batch").is_file() else []
    if not paths:
        expected = "data_batch_1 to data_batch_5" if split == "train" else "test_batch"
        raise FileNotFoundError(
            f"no CIFAR-10 {split} batch ({expected}) in {folder}. Copy it from "
            f"cifar-10-python.tar.gz ({CIFAR10_PAGE}) or pass another folder"
        )

    # Read and stack them.
    batches = [read_cifar10_batch(path) for path in paths]
    data = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    size = CIFAR10_IMAGE_SIZE
    images = torch.from_numpy(data).reshape(-1, 3, size, size)  # (N, 3072) -> (N, 3, 32, 32)
    file_names = ", ".join(path.name for path in paths)
    print(f"data: CIFAR-10 {split}, {len(images):,} images from {file_names} in {folder}")
    if split == "train" and len(paths) < CIFAR10_TRAIN_BATCHES:
        warn(
            f"only {len(paths)} of {CIFAR10_TRAIN_BATCHES} CIFAR-10 training batches in {folder}, "
            f"so the train split has {len(images):,} images instead of 50,000"
        )
    return images, torch.from_numpy(labels), class_names


# ---------------------------------------------------------------------------- CelebA-HQ


def find_celebahq_folder(root: str | Path) -> Path:
    """Return `root` or a known subfolder of it that contains a CelebA-HQ attribute file."""
    root = Path(root)
    candidates = [root] + [root / name for name in CELEBAHQ_SUBFOLDERS]
    for folder in candidates:
        if (folder / CELEBAHQ_ANNO_FILE).is_file() or (folder / CELEBAHQ_CSV_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"no CelebA-HQ attribute file ({CELEBAHQ_ANNO_FILE} or {CELEBAHQ_CSV_FILE}) in "
        f"{' or '.join(map(str, candidates))}. Pass the folder that contains it and the images"
    )


def read_anno_file(path: Path) -> tuple[list[str], dict[str, list[bool]]]:
    """Read CelebAMask-HQ-attribute-anno.txt: a count, the attribute names, rows of 1/-1."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(
            f"{path}: expected a count line, a line of attribute names and one row per image"
        )
    count = int(lines[0])
    names = lines[1].split()
    table = {}
    for line_number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        values = fields[1:]
        if len(values) != len(names) or not set(values) <= {"1", "-1"}:
            raise ValueError(
                f"{path}, line {line_number}: expected an image name and {len(names)} values "
                f"of 1 or -1, got {line[:80]!r}"
            )
        table[fields[0]] = [value == "1" for value in values]
    if len(table) != count:
        raise ValueError(
            f"{path}: the count line gives {count} images, but {len(table)} rows follow"
        )
    return names, table


def read_attributes_csv(path: Path) -> tuple[list[str], dict[str, list[bool]]]:
    """Read attributes.csv with columns image,smiling (1 or 0), which provides only Smiling."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "smiling"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns image,smiling, got {reader.fieldnames}")
        table = {}
        for line_number, row in enumerate(reader, start=2):
            if row["smiling"] not in ("0", "1"):
                raise ValueError(
                    f"{path}, line {line_number}: smiling must be 0 or 1, got {row['smiling']!r}"
                )
            table[row["image"]] = [row["smiling"] == "1"]
    return ["Smiling"], table


def read_celebahq_attributes(folder: Path) -> tuple[Path, list[str], dict[str, list[bool]]]:
    """Read the attribute file of `folder` and return its path, the names and a row per image.

    The anno file is preferred when both exist because it has all 40 attributes.
    """
    anno = folder / CELEBAHQ_ANNO_FILE
    if anno.is_file():
        return (anno, *read_anno_file(anno))
    path = folder / CELEBAHQ_CSV_FILE
    return (path, *read_attributes_csv(path))


def image_sort_key(path: Path) -> tuple:
    """Order `<id>.jpg` files by numeric id and any other names after them, alphabetically."""
    if path.stem.isdigit():
        return (0, int(path.stem), path.name)
    return (1, 0, path.name)


def list_celebahq_images(folder: Path) -> list[Path]:
    """Return the image files of a CelebA-HQ folder ordered by id."""
    image_folders = [folder / name for name in CELEBAHQ_IMAGE_FOLDERS]
    image_folder = next((f for f in image_folders if f.is_dir()), None)
    if image_folder is None:
        raise FileNotFoundError(
            f"no image folder ({' or '.join(CELEBAHQ_IMAGE_FOLDERS)}) in {folder}; "
            f"put the <id>.jpg files in {image_folders[0]}"
        )
    paths = [p for p in image_folder.iterdir() if p.suffix.lower() in CELEBAHQ_IMAGE_SUFFIXES]
    if not paths:
        raise FileNotFoundError(f"no .jpg or .png images in {image_folder}")
    return sorted(paths, key=image_sort_key)


def read_rgb_image(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 (3, H, W).

    Grayscale images are repeated over the three channels, and an alpha channel is dropped
    without blending.
    """
    try:
        with Image.open(path) as image:
            rgb = np.array(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: cannot decode the image ({error}); replace or remove it"
        ) from error
    return torch.from_numpy(rgb).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def split_celebahq_paths(paths: list[Path], split: str) -> list[Path]:
    """Select the images of a split: test is the last 10% by id, train the rest."""
    num_test = math.ceil(len(paths) * CELEBAHQ_TEST_PERCENT / 100)
    if split == "train":
        return paths[: len(paths) - num_test]
    if split == "test":
        return paths[len(paths) - num_test :]
    return paths


def load_celebahq(
    root: str | Path, size: int | None = None, split: str = "all"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Load CelebA-HQ as uint8 images (N, 3, H, W) and a dict of attribute name -> bool (N,).

    Images are ordered by id. With `size`, every image is resized to size x size (bilinear with
    antialiasing). Without it, all images must have the size of the first one. All images are
    decoded into memory: 30,000 images at 256 x 256 take 5.9 GB.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"invalid CelebA-HQ split {split!r}; choose 'train', 'test' or 'all'")
    folder = find_celebahq_folder(root)
    attribute_path, names, table = read_celebahq_attributes(folder)
    paths = split_celebahq_paths(list_celebahq_images(folder), split)
    if not paths:
        raise ValueError(f"the CelebA-HQ {split} split of {folder} is empty")

    # Look up the attributes of each image before decoding, so a missing row fails fast.
    rows = []
    for path in paths:
        if path.name not in table:
            raise ValueError(f"{path}: no row in {attribute_path}; add one or remove the image")
        rows.append(table[path.name])
    values = torch.tensor(rows, dtype=torch.bool)  # (N, number of attributes)
    attributes = {name: values[:, j].clone() for j, name in enumerate(names)}

    # Decode the images and bring them to one size.
    images = []
    progress = Progress(len(paths), f"decode CelebA-HQ {split}", unit="img")
    for path in paths:
        image = read_rgb_image(path)
        height, width = image.shape[1:]
        if size is not None and (height, width) != (size, size):
            if height != width:
                raise ValueError(
                    f"{path}: image is {width}x{height}, but CelebA-HQ images are square; "
                    f"crop it to a square first"
                )
            image = resize_images(image[None], size)[0]
        elif size is None and images and image.shape != images[0].shape:
            first_height, first_width = images[0].shape[1:]
            raise ValueError(
                f"{path}: image is {width}x{height}, but {paths[0].name} is "
                f"{first_width}x{first_height}; pass a size to resize all images to it"
            )
        images.append(image)
        progress.update()
    progress.close()
    images = torch.stack(images)
    print(
        f"data: CelebA-HQ {split}, {len(images):,} images of {images.shape[-1]}x"
        f"{images.shape[-2]} from {folder}, attributes from {attribute_path.name}"
    )
    return images, attributes


# ---------------------------------------------------------------------------- entry point


def load_dataset(
    name: str, root: str | Path | None, split: str = "train", size: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Load a dataset as uint8 images (N, 3, H, W) and a dict of class or attribute -> bool (N,).

    For CIFAR-10 the dict maps each class name to its mask. `root` None downloads CIFAR-10.
    `size` resizes the images to size x size (bilinear with antialiasing).
    """
    check_data_folder(name, root)
    if name == "cifar10":
        images, labels, class_names = load_cifar10(root, split)
        if size is not None and size != CIFAR10_IMAGE_SIZE:
            images = resize_images(images, size)
        masks = {class_name: labels == i for i, class_name in enumerate(class_names)}
        return images, masks
    return load_celebahq(root, size=size, split=split)


def check_data_folder(name: str, root: str | Path | None) -> None:
    """Raise the error of a missing or wrong dataset folder, so scripts can fail before slow work.

    `root` None is valid for CIFAR-10 alone, which load_dataset then downloads.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "cifar10":
        if root is not None:
            find_cifar10_folder(root)
    elif root is None:
        raise ValueError(
            "CelebA-HQ cannot be downloaded automatically; pass the folder with the "
            f"<id>.jpg images and {CELEBAHQ_ANNO_FILE} or {CELEBAHQ_CSV_FILE} with --data"
        )
    else:
        find_celebahq_folder(root)


# ---------------------------------------------------------------------------- keep and forget


def forget_mask(masks: dict[str, torch.Tensor], forget: str) -> torch.Tensor:
    """Return the bool mask of the forget set: the images with class or attribute `forget`.

    Names match case-insensitively. Raises ValueError when the name is unknown or when the
    forget set or the keep set would be empty.
    """
    lookup = {name.lower(): name for name in masks}
    if forget.lower() not in lookup:
        raise ValueError(f"unknown class or attribute {forget!r}; valid names: {', '.join(masks)}")
    name = lookup[forget.lower()]
    mask = masks[name]
    count = int(mask.sum())
    if count == 0:
        raise ValueError(
            f"the forget set {name!r} is empty: 0 of {len(mask):,} images have it; "
            f"choose another class or attribute"
        )
    if count == len(mask):
        raise ValueError(
            f"the keep set is empty: all {count:,} images have {name!r}; "
            f"choose another class or attribute"
        )
    return mask


def split_keep_forget(
    images: torch.Tensor, masks: dict[str, torch.Tensor], forget: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split images into the keep set and the forget set (class or attribute `forget`)."""
    mask = forget_mask(masks, forget)
    return images[~mask], images[mask]


# ---------------------------------------------------------------------------- batches


def epoch_seed(seed: int, epoch: int) -> int:
    """Derive an independent 64-bit seed for one epoch with numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


class BatchIterator:
    """Endless shuffled minibatches in [-1, 1] with random horizontal flips, as in DDPM training.

    Each epoch visits the images in a new random order and drops its last incomplete batch. The
    order and the flips of an epoch depend only on (seed, epoch), so restoring `state_dict()`
    (seed, epoch, position) continues with exactly the batches an uninterrupted run would get.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0, flip: bool = True):
        check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(images) < batch_size:
            raise ValueError(
                f"only {len(images):,} images for a batch size of {batch_size:,}; "
                f"lower the batch size or add images"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.images = images  # uint8, or float in [-1, 1]
        self.batch_size = batch_size
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index of the next image in this epoch's order
        self.shuffle()

    def shuffle(self) -> None:
        """Draw the image order and the flips of the current epoch."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        self.order = torch.randperm(len(self.images), generator=generator)
        self.flips = torch.rand(len(self.images), generator=generator) < 0.5

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.images):
            self.epoch += 1
            self.position = 0
            self.shuffle()

        # Gather the batch and bring it to [-1, 1].
        window = slice(self.position, self.position + self.batch_size)
        batch = self.images[self.order[window]]
        if batch.dtype == torch.uint8:
            batch = to_model_range(batch)

        # Mirror the drawn images left to right.
        if self.flip:
            flips = self.flips[window].view(-1, 1, 1, 1)
            batch = torch.where(flips, batch.flip(-1), batch)
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        """Return the position as plain ints, ready for a JSON checkpoint sidecar."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_images": len(self.images),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` taken over the same images and batch size."""
        for key, current in (("num_images", len(self.images)), ("batch_size", self.batch_size)):
            if state[key] != current:
                raise ValueError(
                    f"cannot resume: the saved iterator had {key} {state[key]}, this one has "
                    f"{current}; resume with the same data and batch size"
                )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.shuffle()
