import io
import zipfile

import numpy as np
import pytest
import torch

from advframe import data, episodes, intrinsic_dimension, models
from advframe.errors import ConfigError, DataError


def write_omniglot(root, sets):
    """Tiny Omniglot-like sets as folders and as a zip: ``{set: {alphabet: characters}}``."""
    from PIL import Image

    for set_name, alphabets in sets.items():
        archive = zipfile.ZipFile(root / f"{set_name}.zip", "w")
        for alphabet, characters in alphabets.items():
            for c in range(characters):
                for drawer in range(4):
                    image = np.full((105, 105), 255, dtype=np.uint8)
                    image[10 + c * 5: 30 + c * 5, 20 + drawer: 60] = 0  # black ink on white
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    archive.writestr(f"{set_name}/{alphabet}/character{c + 1:02d}/{drawer}.png", buffer.getvalue())
        archive.close()


def test_omniglot_from_zip_files_with_rotations_and_held_out_alphabets(tmp_path):
    write_omniglot(tmp_path, {"images_background": {"A": 3, "B": 2, "C": 2, "D": 2}})
    splits = data.load({"name": "omniglot", "root": str(tmp_path), "rotations": [0, 90], "image_size": 28})
    assert splits.train.num_classes == (3 + 2 + 2) * 2 and splits.test.num_classes == 2 * 2
    assert all(name.startswith("D/") for name in splits.test.class_names)
    inputs, _ = splits.train.batch(torch.arange(1))
    assert inputs.shape == (1, 1, 28, 28) and inputs.max() > 0.5 and inputs.mean() < 0.5  # ink is 1 after inverting
    rotated = splits.train.inputs[splits.train.labels == 1][0, 0]
    upright = splits.train.inputs[splits.train.labels == 0][0, 0]
    assert torch.equal(rotated, torch.from_numpy(np.rot90(upright.numpy()).copy()))
    explicit = data.load({"name": "omniglot", "root": str(tmp_path), "test_alphabets": ["A"]})
    assert all(name.startswith("A/") for name in explicit.test.class_names)
    with pytest.raises(DataError, match="unknown alphabets"):
        data.load({"name": "omniglot", "root": str(tmp_path), "test_alphabets": ["Z"]})


def test_omniglot_folders_and_evaluation_set(tmp_path):
    write_omniglot(tmp_path, {"images_background": {"A": 2}, "images_evaluation": {"E": 2}})
    for archive in tmp_path.glob("*.zip"):
        zipfile.ZipFile(archive).extractall(tmp_path / "extracted")
    splits = data.load({"name": "omniglot", "root": str(tmp_path / "extracted")})
    assert splits.test.class_names == ["E/character01", "E/character02"]


def test_mnist_fewshot_split_is_disjoint():
    splits = data.load({"name": "mnist-fewshot"})
    assert splits.train.class_names == ["0", "1", "2", "3", "4"] and splits.test.class_names == ["5", "6", "7", "8", "9"]
    assert len(splits.train) == len(splits.test) == 2500
    with pytest.raises(DataError, match="disjoint"):
        data.load({"name": "mnist-fewshot", "train_classes": [0, 1], "test_classes": [1, 2]})


def test_sampler_gives_the_shots_asked_and_never_mixes_splits():
    splits = data.load({"name": "mnist-fewshot"})
    train = episodes.EpisodeSampler(splits.train, ways=3, shots=5, queries=4)
    test = episodes.EpisodeSampler(splits.test, ways=3, shots=1, queries=4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        task = train.sample(generator)
        assert torch.bincount(task.support_labels).tolist() == [5, 5, 5]
        assert torch.bincount(task.query_labels).tolist() == [4, 4, 4]
        assert {splits.train.class_names[c] for c in task.classes} <= set("01234")
        shot = test.sample(generator)
        assert torch.bincount(shot.support_labels).tolist() == [1, 1, 1]
        assert {splits.test.class_names[c] for c in shot.classes} <= set("56789")
    # support and query never share an image
    task = train.sample(torch.Generator().manual_seed(3))
    support = {tuple(x.flatten().tolist()) for x in task.support_inputs}
    assert not any(tuple(x.flatten().tolist()) in support for x in task.query_inputs)
    # the test tasks are fixed
    first, second = test.fixed_tasks(3), test.fixed_tasks(3)
    assert all(torch.equal(a.query_inputs, b.query_inputs) for a, b in zip(first, second))
    with pytest.raises(ConfigError, match="need 6 classes"):
        episodes.EpisodeSampler(splits.test, ways=6, shots=1, queries=1)


@pytest.mark.parametrize("estimator", ["twonn", "mle", "pca"])
def test_intrinsic_dimension_recovers_a_known_subspace(estimator):
    generator = np.random.default_rng(0)
    for true_dimension in (2, 6):
        latent = generator.uniform(size=(1500, true_dimension))
        embedding = generator.normal(size=(true_dimension, 40))
        points = latent @ embedding  # a flat d-dimensional subspace of R^40
        estimate = intrinsic_dimension.ESTIMATORS[estimator](points)
        if estimator == "pca":
            assert estimate <= true_dimension
        else:
            assert abs(estimate - true_dimension) < 0.25 * true_dimension + 0.3, (estimator, true_dimension, estimate)


def test_fewshot_backbones():
    for name, shape in (("conv4", (1, 28, 28)), ("resnet12", (3, 32, 32))):
        model = models.build({"name": name, "args": {}}, shape, 5)
        model.eval()
        assert model(torch.rand(2, *shape)).shape == (2, 5)
        assert models.embed(model, torch.rand(2, *shape)).shape[0] == 2


def test_mean_and_ci():
    mean, ci = episodes.mean_and_ci95(torch.tensor([0.5, 0.7, 0.6, 0.6]))
    assert mean == pytest.approx(0.6) and ci == pytest.approx(1.96 * torch.tensor([0.5, 0.7, 0.6, 0.6]).std().item() / 2)


class NearestMean:
    """A minimal meta-learner for the runner's episodic path: trains the embedding with a
    prototype loss on task batches and adapts by averaging support embeddings."""

    __name__ = "nearest-mean"

    from advframe import hookimpl

    @staticmethod
    @hookimpl
    def run_defaults():
        return {"data": {"name": "mnist-fewshot", "train_size": 600, "test_size": 300},
                "meta": {"episodic_training": True, "ways": 3, "queries": 5, "tasks_per_epoch": 8,
                         "tasks_per_batch": 2, "test_tasks": 6, "train_shots": 3}}

    @staticmethod
    def prototype_logits(model, support, query_inputs):
        inputs, labels = support
        embedded = models.embed(model, inputs)
        ways = int(labels.max()) + 1
        prototypes = torch.stack([embedded[labels == c].mean(0) for c in range(ways)])
        return -torch.cdist(models.embed(model, query_inputs), prototypes) ** 2

    @staticmethod
    @hookimpl
    def training_step(model, batch):
        assert isinstance(batch, list) and len(batch) == 2 and batch[0].ways == 3
        assert torch.bincount(batch[0].support_labels).tolist() == [3, 3, 3]
        losses = [torch.nn.functional.cross_entropy(NearestMean.prototype_logits(model, t.support, t.query_inputs),
                                                    t.query_labels) for t in batch]
        return torch.stack(losses).mean()

    @staticmethod
    @hookimpl
    def adapt_task(model, support):
        class Adapted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, inputs):
                return NearestMean.prototype_logits(self.model, support, inputs)

        assert torch.bincount(support[1]).tolist() == [1, 1, 1]  # meta-test uses test_shots
        return Adapted()


def test_an_episodic_run_trains_on_task_batches_and_reports_task_accuracy(tmp_path):
    from advframe.runner import Run
    from advframe.testing import make_host, tiny_config

    host = make_host((NearestMean(), "nearest-mean"))
    config = tiny_config(host, "nearest-mean", user={"data": {"name": "mnist-fewshot"}, "model": {"name": "small-cnn"}})
    assert config["meta"]["learner"] == "nearest-mean" and config["meta"]["episodic_training"]
    assert config["meta"]["ways"] == 3 and config["data"]["train_size"] == 96  # run defaults under the user's
    run = Run.start(host, config, tmp_path / "run")
    results = run.execute()
    metrics = results["metrics"]
    assert 0 <= metrics["robust_accuracy"] <= metrics["clean_accuracy"] <= 1
    assert metrics["test_tasks"] == 6 and metrics["clean_accuracy_ci95"] > 0
    assert "per_class_robust_accuracy" not in metrics


def test_a_fewshot_run_refuses_overlapping_classes(tmp_path):
    from advframe.runner import Run
    from advframe.testing import make_host, tiny_config

    host = make_host((NearestMean(), "nearest-mean"))
    config = tiny_config(host, "nearest-mean", ["data.name=digits"])
    with pytest.raises(ConfigError, match="disjoint train and test classes"):
        Run.start(host, config, tmp_path / "run")


def test_inner_loop_second_order_differs_from_first_order_and_leaves_the_model_alone():
    from advframe import meta

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support = (torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    query = (torch.randn(6, 4), torch.tensor([2, 1, 0, 2, 1, 0]))
    gradients = {}
    for first_order in (True, False):
        params = meta.inner_loop(model, support, steps=2, lr=0.5, first_order=first_order)
        loss = torch.nn.functional.cross_entropy(meta.functional_forward(model, params, query[0]), query[1])
        gradients[first_order] = torch.autograd.grad(loss, list(model.parameters()))
    # a curved loss (tanh, two steps): the Hessian term makes the meta-gradients differ
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(gradients[True], gradients[False]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    adapted = meta.AdaptedModel(model, params)
    assert adapted(query[0]).shape == (6, 3)
