import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advframe import data, hookimpl, segmentation
from advframe.errors import DataError
from advframe.runner import Run
from advframe.testing import make_host, tiny_config


def test_dice_on_hand_made_masks():
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    target[:, :2, :2] = 1  # 4 foreground pixels
    predicted = torch.zeros_like(target)
    predicted[0] = target[0]  # perfect
    predicted[1, :2, :1] = 1  # 2 of 4, no false positives: 2*2 / (2 + 4)
    predicted[2, 2:, 2:] = 1  # disjoint
    assert segmentation.dice(predicted, target).tolist() == pytest.approx([1.0, 4 / 6, 0.0])
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    assert segmentation.dice(empty, empty).item() == 1.0


def test_mnist_segmentation_masks_are_the_digit_pixels_and_classes_are_disjoint():
    splits = data.load({"name": "mnist-segmentation", "train_size": 50, "test_size": 20})
    assert splits.train.input_shape == (1, 56, 56) and splits.train.labels.shape == (50, 56, 56)
    assert splits.train.class_names == ["background", "0", "1", "2", "3", "4"]
    assert splits.test.class_names == ["background", "5", "6", "7", "8", "9"]
    inputs, maps = splits.train.batch(torch.arange(50))
    assert (inputs[:, 0][maps > 0] > 0.5).all()  # every labelled pixel is ink
    assert ((maps > 0).flatten(1).sum(1) > 20).all()
    sampler = segmentation.SegmentationSampler(splits.train, shots=2, queries=1)
    task = sampler.sample(torch.Generator().manual_seed(0))
    assert task.support_inputs.shape == (2, 1, 56, 56) and set(task.support_labels.unique().tolist()) == {0, 1}
    assert task.support_labels.flatten(1).any(1).all() and task.query_labels.any()


def test_segmentation_folder_reads_image_mask_pairs(tmp_path):
    from PIL import Image

    for split, organs in (("train", [1, 2, 3]), ("test", [3])):
        for folder in ("images", "masks"):
            (tmp_path / split / folder).mkdir(parents=True)
        for i in range(3):
            mask = np.zeros((16, 16), dtype=np.uint8)
            for organ in organs:
                mask[organ * 3: organ * 3 + 2, i: i + 5] = organ
            Image.fromarray((mask * 60).astype(np.uint8)).save(tmp_path / split / "images" / f"s{i}.png")
            Image.fromarray(mask).save(tmp_path / split / "masks" / f"s{i}.png")
    splits = data.load({"name": "segmentation-folder", "root": str(tmp_path)})
    assert splits.train.class_names == ["background", "1", "2"]  # organ 3 is the test organ: removed from training
    assert splits.test.class_names == ["background", "3"]
    assert set(splits.test.labels.unique().tolist()) == {0, 1}
    (tmp_path / "test" / "masks" / "s0.png").unlink()
    with pytest.raises(DataError, match="no mask for s0.png"):
        data.load({"name": "segmentation-folder", "root": str(tmp_path)})


class PrototypeSegmenter:
    """Masked average pooling of support features, cosine logits per pixel (a minimal PANet)."""

    __name__ = "proto-seg"

    @staticmethod
    def logits(model, support, query_inputs):
        inputs, masks = support
        features = model(inputs)
        weights = masks[:, None].float()
        foreground = (features * weights).sum((0, 2, 3)) / weights.sum().clamp_min(1)
        background = (features * (1 - weights)).sum((0, 2, 3)) / (1 - weights).sum().clamp_min(1)
        prototypes = torch.stack([background, foreground])
        query = F.normalize(model(query_inputs), dim=1)
        return 10 * torch.einsum("bchw,kc->bkhw", query, F.normalize(prototypes, dim=1))

    @staticmethod
    @hookimpl
    def run_defaults():
        return {"data": {"name": "mnist-segmentation"}, "model": {"name": "tests.segmentation_backbone:Backbone"},
                "meta": {"episodic_training": True, "ways": 1, "queries": 1, "tasks_per_epoch": 8,
                         "tasks_per_batch": 4, "test_tasks": 6},
                "eval": {"attacks": [{"name": "test-pgd", "steps": 3}]}}

    @staticmethod
    @hookimpl
    def training_step(model, batch):
        return torch.stack([F.cross_entropy(PrototypeSegmenter.logits(model, t.support, t.query_inputs), t.query_labels)
                            for t in batch]).mean()

    @staticmethod
    @hookimpl
    def adapt_task(model, support):
        class Adapted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, inputs):
                return PrototypeSegmenter.logits(self.model, support, inputs)

        return Adapted()


def test_a_fewshot_segmentation_run_reports_dice_clean_and_attacked(tmp_path, monkeypatch):
    import sys
    import types

    backbone = types.ModuleType("tests.segmentation_backbone")
    backbone.Backbone = lambda in_channels, **unused: torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
    monkeypatch.setitem(sys.modules, "tests.segmentation_backbone", backbone)
    host = make_host((PrototypeSegmenter(), "proto-seg"))
    config = tiny_config(host, "proto-seg", ["data.train_size=40", "data.test_size=20", "attack.eps=0.2",
                                             "eval.attacks=[{name: test-pgd, steps: 5, alpha: 0.05}]"],
                         user={"data": {"name": "mnist-segmentation"}, "model": {"name": "tests.segmentation_backbone:Backbone"}})
    metrics = Run.start(host, config, tmp_path / "run").execute()["metrics"]
    assert metrics["test_tasks"] == 6 and 0 <= metrics["dice"] <= 1 and metrics["dice_ci95"] >= 0
    assert metrics["robust_dice"] < metrics["dice"]


class EntropyOnTarget:
    """A minimal domain-adaptation method: source CE plus entropy minimisation on target inputs."""

    __name__ = "entropy-da"

    @staticmethod
    @hookimpl
    def training_step(model, batch, ctx):
        inputs, labels = batch
        target_logits = model(batch.target_inputs)
        probabilities = target_logits.softmax(1)
        entropy = -(probabilities * probabilities.clamp_min(1e-8).log()).sum(1).mean()
        return {"loss": F.cross_entropy(model(inputs), labels) + 0.1 * entropy,
                "pseudo_label_accuracy": ctx.score_pseudo_labels(batch.target_index, target_logits.argmax(1))}


def test_domain_adaptation_batches_carry_unlabelled_target_images(tmp_path):
    splits = data.load({"name": "mnist-to-digits"})
    assert splits.train.input_shape == splits.target.input_shape == splits.test.input_shape == (1, 16, 16)
    assert (len(splits.train), len(splits.target), len(splits.test)) == (5000, 1200, 597)
    host = make_host((EntropyOnTarget(), "entropy-da"))
    settings = ["data.name=mnist-to-digits", "data.train_size=200", "train.epochs=2", "data.target_ratio=2"]
    config = tiny_config(host, "entropy-da", settings)
    first = Run.start(host, config, tmp_path / "a")
    results = first.execute()
    logged = [__import__("json").loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= logged[-1]["pseudo_label_accuracy"] <= 1 and 0 <= results["metrics"]["clean_accuracy"] <= 1
    # the target's labels never reach a training step: garbage labels leave training unchanged
    second = Run(host, config, tmp_path / "b")
    second.out_dir.mkdir()
    second.splits.target.labels = torch.randint(0, 10, second.splits.target.labels.shape)
    second.train()
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key


def test_prototypes_come_from_the_masked_pixels_and_logits_are_cosines():
    features = torch.zeros(2, 3, 4, 4)
    features[:, 0, :2] = 1.0  # channel 0 on the top half
    features[:, 1, 2:] = 1.0  # channel 1 on the bottom half
    masks = torch.zeros(2, 8, 8)
    masks[:, :4] = 1  # the top half at mask resolution
    prototype = segmentation.masked_average_pooling(features, masks)
    assert prototype[0] > 0.9 and prototype[1] < 0.1
    logits = segmentation.prototype_logits(features, torch.stack([prototype, torch.tensor([0.0, 1.0, 0.0])]), (8, 8))
    assert logits.shape == (2, 2, 8, 8)
    assert (logits[:, 0, 0, 0] > logits[:, 1, 0, 0]).all() and (logits[:, 1, 7, 7] > logits[:, 0, 7, 7]).all()
