"""Few-shot segmentation data, episodes and the Dice metric.

A segmentation split is an :class:`advframe.data.ArrayDataset` whose labels are label maps
(``N x H x W``, 0 = background, 1..C = the split's classes). A 1-way K-shot task picks one class and
K + q images that contain it; its support and query labels are binary masks of that class.

* ``mnist-segmentation`` (embedded default): two digits of different classes on a 56 x 56 canvas; the
  mask of a class is the pixels (> 0.5) of its digit. Train canvases use digits 0-4, test canvases
  5-9 (``data.train_classes`` / ``data.test_classes``), so test classes are never seen in training.
* ``segmentation-folder``: 2-D slices as image / mask file pairs, for users' own (e.g. medical) data:
  ``root/train/images/NAME.png`` with ``root/train/masks/NAME.png`` (integer class ids, 0 =
  background), and the same under ``root/test``. ``data.test_classes`` are removed from the training
  masks (the in-domain protocol: the test organ is never seen in training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from advframe.data import SPLIT_SEED, ArrayDataset, Splits, _mnist_subset
from advframe.episodes import Task
from advframe.errors import ConfigError, DataError, PluginError
from advframe.models import eval_mode, unwrap

BACKGROUND = "background"


def dice(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks, per example (``N x H x W`` -> ``N``); two empty masks score 1."""
    predicted, target = predicted.flatten(1).bool(), target.flatten(1).bool()
    overlap = (predicted & target).sum(1).float()
    total = predicted.sum(1).float() + target.sum(1).float()
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))


def is_segmentation(dataset: ArrayDataset) -> bool:
    return dataset.labels.dim() == 3


class SegmentationSampler:
    """1-way K-shot segmentation tasks with ``queries`` query images."""

    def __init__(self, dataset: ArrayDataset, shots: int, queries: int):
        self.dataset, self.shots, self.queries = dataset, shots, queries
        present = torch.stack([(dataset.labels == c).flatten(1).any(1) for c in range(dataset.num_classes)])
        self.members = [present[c].nonzero().flatten() for c in range(dataset.num_classes)]
        self.usable = torch.tensor([c for c in range(1, dataset.num_classes) if len(self.members[c]) >= shots + queries])
        if len(self.usable) == 0:
            raise ConfigError(f"{shots}-shot segmentation tasks with {queries} queries need a class present in "
                              f"{shots + queries} images; this split has none (lower the shots or meta.queries)")

    def sample(self, generator: torch.Generator) -> Task:
        cls = int(self.usable[torch.randint(len(self.usable), (1,), generator=generator)])
        members = self.members[cls]
        picked = members[torch.randperm(len(members), generator=generator)[: self.shots + self.queries]]
        inputs, maps = self.dataset.batch(picked)
        masks = (maps == cls).long()
        return Task(inputs[: self.shots], masks[: self.shots], inputs[self.shots:], masks[self.shots:],
                    torch.tensor([cls]))

    def fixed_tasks(self, count: int, seed: int) -> list[Task]:
        generator = torch.Generator().manual_seed(seed)
        return [self.sample(generator) for _ in range(count)]


def _canvases(images: torch.Tensor, labels: torch.Tensor, classes: list[int], count: int, seed: int) -> ArrayDataset:
    generator = torch.Generator().manual_seed(seed)
    pools = [(labels == c).nonzero().flatten() for c in classes]
    canvas = torch.zeros(count, 1, 56, 56)
    maps = torch.zeros(count, 56, 56, dtype=torch.long)
    for index in range(count):
        first, second = torch.randperm(len(classes), generator=generator)[:2].tolist()
        for slot, which in enumerate((first, second)):
            pool = pools[which]
            digit = images[pool[torch.randint(len(pool), (1,), generator=generator)]].float()[0, 0] / 255
            top = int(torch.randint(0, 29, (1,), generator=generator))
            left = int(torch.randint(0, 3, (1,), generator=generator)) + 26 * slot
            region = canvas[index, 0, top:top + 28, left:left + 28]
            canvas[index, 0, top:top + 28, left:left + 28] = torch.maximum(region, digit)
            maps[index, top:top + 28, left:left + 28][digit > 0.5] = which + 1
    return ArrayDataset((canvas * 255).round().to(torch.uint8), maps, len(classes) + 1,
                        [BACKGROUND, *(str(c) for c in classes)])


def load_mnist_segmentation(root=None, train_classes=None, test_classes=None, train_size=None, test_size=None) -> Splits:
    train_classes = list(range(5)) if train_classes is None else list(train_classes)
    test_classes = list(range(5, 10)) if test_classes is None else list(test_classes)
    if set(train_classes) & set(test_classes) or len(train_classes) < 2 or len(test_classes) < 2:
        raise DataError("mnist-segmentation needs disjoint train and test classes, at least two digits each")
    images, labels = _mnist_subset()
    return Splits(_canvases(images, labels, train_classes, train_size or 2000, SPLIT_SEED),
                  _canvases(images, labels, test_classes, test_size or 500, SPLIT_SEED + 1))


def _read_pairs(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"segmentation-folder: expected {image_dir} and {mask_dir} with matching file names")
    images, masks = [], []
    for path in sorted(image_dir.iterdir()):
        mask_path = next((mask_dir / f"{path.stem}{suffix}" for suffix in (".png", ".tif", ".tiff", path.suffix)
                          if (mask_dir / f"{path.stem}{suffix}").is_file()), None)
        if mask_path is None:
            raise DataError(f"segmentation-folder: no mask for {path.name} in {mask_dir}")
        try:
            with Image.open(path) as image, Image.open(mask_path) as mask:
                images.append(np.asarray(image.convert("L"), dtype=np.uint8))
                masks.append(np.asarray(mask, dtype=np.int64))
        except OSError as exc:
            raise DataError(f"segmentation-folder: cannot read {path.name}: {exc}") from None
        if images[-1].shape != masks[-1].shape or images[-1].shape != images[0].shape:
            raise DataError(f"segmentation-folder: {path.name} and its mask must share one size with every slice")
    if not images:
        raise DataError(f"segmentation-folder: no images in {image_dir}")
    return np.stack(images)[:, None], np.stack(masks)


def load_segmentation_folder(root, train_classes=None, test_classes=None, train_size=None, test_size=None) -> Splits:
    if root is None:
        raise DataError("data.name=segmentation-folder needs data.root: a folder with train/ and test/ "
                        "(each holding images/ and masks/)")
    root = Path(root).expanduser()
    train_images, train_maps = _read_pairs(root / "train")
    test_images, test_maps = _read_pairs(root / "test")
    test_classes = sorted(set(np.unique(test_maps).tolist()) - {0}) if test_classes is None else list(test_classes)
    train_classes = sorted(set(np.unique(train_maps).tolist()) - {0} - set(test_classes)) \
        if train_classes is None else list(train_classes)
    if not train_classes or not test_classes:
        raise DataError("segmentation-folder: need at least one training and one test class")

    def relabel(images, maps, classes):
        lookup = np.zeros(int(max(maps.max(), max(classes))) + 1, dtype=np.int64)
        lookup[classes] = np.arange(1, len(classes) + 1)  # other classes become background
        return ArrayDataset(torch.from_numpy(images), torch.from_numpy(lookup[maps]), len(classes) + 1,
                            [BACKGROUND, *(str(c) for c in classes)])

    return Splits(relabel(train_images, train_maps, train_classes), relabel(test_images, test_maps, test_classes))


def masked_average_pooling(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean feature vector under each mask (PANet): features ``K x C x h x w``, masks ``K x H x W``
    (upsampled features are pooled at mask resolution, as PNODE does) -> ``C``."""
    features = torch.nn.functional.interpolate(features, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    weights = masks[:, None].to(features.dtype)
    return (features * weights).sum((0, 2, 3)) / weights.sum().clamp_min(1e-5)


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, size: tuple[int, int],
                     scale: float = 20.0) -> torch.Tensor:
    """Scaled cosine similarity of every pixel's feature to each prototype (``P x C``), upsampled to
    ``size``: logits ``B x P x H x W``."""
    similarity = torch.einsum("bchw,pc->bphw", torch.nn.functional.normalize(features, dim=1),
                              torch.nn.functional.normalize(prototypes, dim=1))
    return torch.nn.functional.interpolate(scale * similarity, size=size, mode="bilinear", align_corners=False)


def support_prototypes(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Background and foreground prototypes (``2 x C``) of a K-shot support: masked average pooling
    per shot, then the mean over shots (PANet's getFeatures / getPrototype)."""
    masks = masks.to(features.dtype)
    per_shot = [torch.stack([masked_average_pooling(f[None], 1 - m[None]), masked_average_pooling(f[None], m[None])])
                for f, m in zip(features, masks)]
    return torch.stack(per_shot).mean(0)


def segmentation_episodes(batch, plugin: str) -> list[Task]:
    """The episodes of a training batch, or one clear error when the run is not few-shot segmentation."""
    tasks = batch if isinstance(batch, list) else [batch]
    if not tasks or not all(isinstance(t, Task) and t.support_labels.dim() == 3 for t in tasks):
        raise PluginError(f"{plugin} trains on segmentation episodes (a mask per image): use data.name="
                          f"mnist-segmentation or segmentation-folder with meta.episodic_training=true")
    return tasks


def check_feature_maps(model: torch.nn.Module, ctx) -> int:
    """The number of channels of the model's feature maps; a model that returns anything else is refused."""
    with torch.no_grad(), eval_mode(model):
        features = model(torch.zeros(1, *ctx.input_shape, device=ctx.device))
    if features.dim() != 4:
        raise PluginError(f"{ctx.current_plugin} needs a model returning feature maps (B x C x h x w), but it "
                          f"returns {tuple(features.shape)}; use model.name=seg-encoder")
    return features.shape[1]


class PrototypeSegmenter(torch.nn.Module):
    """An adapted few-shot segmenter: query images -> per-pixel logits ``(B, 2, H, W)`` (background,
    foreground) against prototypes fixed from the support; the feature model runs in eval mode."""

    def __init__(self, model: torch.nn.Module, prototypes: torch.Tensor, scale: float):
        super().__init__()
        self.model, self.scale = model, scale
        self.register_buffer("prototypes", prototypes.detach())

    @classmethod
    def from_support(cls, model: torch.nn.Module, support, scale: float, plugin: str) -> PrototypeSegmenter:
        """``adapt_task`` for prototype segmenters: prototypes from the support alone, no gradient."""
        inputs, masks = support
        if masks.dim() != 3:
            raise PluginError(f"{plugin} adapts to segmentation supports (a mask per image): use data.name="
                              f"mnist-segmentation or segmentation-folder")
        model = unwrap(model)
        with eval_mode(model), torch.no_grad():
            prototypes = support_prototypes(model(inputs), masks)
        return cls(model, prototypes, scale)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model):
            return prototype_logits(self.model(inputs), self.prototypes, inputs.shape[-2:], self.scale)


def segmentation_run_defaults() -> dict:
    """``run_defaults`` of a few-shot segmentation method: the embedded MNIST segmentation task,
    1-way 1-shot episodes with one query (5 per step, 300 an epoch, 5 epochs), 300 fixed test tasks,
    FGSM and PGD-10 on the query at eps 0.1 without early stop (success is per pixel)."""
    return {"data": {"name": "mnist-segmentation"}, "model": {"name": "seg-encoder"},
            "train": {"epochs": 5, "monitor_examples": 0},
            "attack": {"name": "pgd", "eps": 0.1},
            "eval": {"attacks": [{"name": "fgsm", "stop_on_success": False},
                                 {"name": "pgd", "steps": 10, "restarts": 1, "stop_on_success": False}]},
            "meta": {"episodic_training": True, "ways": 1, "queries": 1, "train_shots": 1, "test_shots": 1,
                     "tasks_per_batch": 5, "tasks_per_epoch": 300, "test_tasks": 300}}
