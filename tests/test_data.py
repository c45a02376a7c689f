import gzip
import pickle

import numpy as np
import pytest
import torch

from advframe import data
from advframe.errors import DataError


def test_embedded_mnist_is_a_fixed_stratified_split():
    splits = data.load({"name": "mnist"})
    assert (len(splits.train), len(splits.test)) == (4000, 1000)
    assert torch.bincount(splits.test.labels).tolist() == [100] * 10
    inputs, _ = splits.train.batch(torch.arange(8))
    assert inputs.shape == (8, 1, 28, 28) and 0 <= inputs.min() and inputs.max() <= 1
    again = data.load({"name": "mnist"})
    assert torch.equal(again.test.inputs, splits.test.inputs)


def test_validation_and_size_limits_carve_disjoint_subsets():
    splits = data.load({"name": "digits", "validation_size": 100, "train_size": 500, "test_size": 50})
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (500, 100, 50)
    train_rows = {tuple(r.flatten().tolist()) for r in splits.train.inputs}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in splits.validation.inputs[:20])


def write_cifar_batch(path, images, labels, label_key="labels", protocol=2, bytes_keys=False):
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    batch = {key("batch_label"): "training batch", key(label_key): [int(v) for v in labels],
             key("data"): images.reshape(len(images), -1), key("filenames"): [f"img{i}.png" for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


@pytest.mark.parametrize("protocol, bytes_keys", [(2, False), (4, True)])
def test_cifar10_python_batches_are_read_without_unpickling(tmp_path, protocol, bytes_keys, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 4)
        write_cifar_batch(root / name, images, labels, protocol=protocol, bytes_keys=bytes_keys)
        expected[name] = (images, labels)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    splits = data.load({"name": "cifar10", "root": str(tmp_path)})
    assert len(splits.train) == 20 and len(splits.test) == 4
    assert torch.equal(splits.test.inputs, torch.from_numpy(expected["test_batch"][0]))
    assert splits.test.labels.tolist() == expected["test_batch"][1].tolist()
    assert torch.equal(splits.train.inputs[:4], torch.from_numpy(expected["data_batch_1"][0]))


def test_cifar100_uses_fine_labels(tmp_path):
    images = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(tmp_path / "train", images, [5, 99, 0], label_key="fine_labels")
    write_cifar_batch(tmp_path / "test", images, [1, 2, 3], label_key="fine_labels")
    splits = data.load({"name": "cifar100", "root": str(tmp_path)})
    assert splits.train.labels.tolist() == [5, 99, 0] and splits.num_classes == 100


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label, name in enumerate(["cat", "dog"]):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((6, 6, 3), 40 * label + i, dtype=np.uint8)).save(folder / f"{i}.png")
    splits = data.load({"name": "imagefolder", "root": str(tmp_path)})
    assert splits.train.input_shape == (3, 6, 6) and splits.train.class_names == ["cat", "dog"]
    assert splits.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    inputs, _ = splits.test.batch(torch.tensor([3]))
    assert inputs[0, 0, 0, 0].item() == pytest.approx(40 / 255)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_plain_and_gzipped(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 8]))
    splits = data.load({"name": "mnist-idx", "root": str(tmp_path)})
    assert splits.train.input_shape == (1, 28, 28) and splits.test.labels.tolist() == [7, 8]
    assert torch.equal(splits.train.inputs[:, 0], torch.from_numpy(images.astype(np.uint8)))


@pytest.mark.parametrize("config, message", [
    ({"name": "cifar10", "root": None}, "needs data.root"),
    ({"name": "cifar10", "root": "/nonexistent/cifar"}, "missing data_batch_1"),
    ({"name": "imagefolder", "root": "/nonexistent"}, "expected /nonexistent/train"),
    ({"name": "mnist-idx", "root": "/nonexistent"}, "train-images-idx3-ubyte[.gz] not found"),
    ({"name": "svhn"}, "unknown data set 'svhn'"),
])
def test_missing_data_gives_one_clear_line(config, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        data.load(config)


def test_corrupt_files_are_reported(tmp_path):
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + b"short body")
    with pytest.raises(DataError, match="header says shape"):
        data.read_idx(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03gar")
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "t10k-images-idx3-ubyte")
    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="not a CIFAR python batch"):
        data.read_pickled_batch(tmp_path / "test_batch", "labels")


def test_augment_crop_and_flip_keep_shape_and_range():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(16, 3, 32, 32)
    out = data.augment(inputs, "crop-flip", generator)
    assert out.shape == inputs.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, inputs)
    assert torch.equal(data.augment(inputs, "none", generator), inputs)


@pytest.mark.parametrize("name, features, classes", [("breast-cancer", 30, 2), ("wine", 13, 3), ("iris", 4, 3)])
def test_tabular_sets_are_scaled_feature_vectors(name, features, classes):
    splits = data.load({"name": name})
    assert splits.input_shape == (features,) and splits.num_classes == classes
    assert splits.train.inputs.min() == 0 and splits.train.inputs.max() == 1
    assert 0 <= splits.test.inputs.min() and splits.test.inputs.max() <= 1


def test_a_tabular_run_trains_an_mlp_and_attacks_in_feature_space(tmp_path):
    from advframe.errors import ConfigError
    from advframe.runner import Run
    from advframe.testing import make_host, tiny_config

    host = make_host()
    config = tiny_config(host, "erm", ["data.name=breast-cancer", "model.name=mlp", "model.args={hidden: [32]}",
                                       "train.epochs=20", "data.train_size=null", "data.test_size=null",
                                       "attack.eps=0.1", "eval.attacks=[{name: test-pgd, steps: 10, alpha: 0.02}]"])
    metrics = Run.start(host, config, tmp_path / "run").execute()["metrics"]
    assert metrics["clean_accuracy"] > 0.85 and metrics["robust_accuracy"] < metrics["clean_accuracy"]
    with pytest.raises(ConfigError, match="use model.name=mlp"):
        Run.start(host, tiny_config(host, "erm", ["data.name=wine"]), tmp_path / "cnn")


def write_text_data(root):
    good = ["a wonderful delightful film", "truly great and moving", "wonderful acting great story",
            "a delightful great time", "moving and wonderful"]
    bad = ["a dull boring mess", "terrible acting awful story", "boring and dull", "an awful terrible film",
           "dull dull boring"]
    rows = [f"pos\t{t}" for t in good] + [f"neg\t{t}" for t in bad]
    (root / "train.tsv").write_text("\n".join(rows * 6) + "\n")
    (root / "test.tsv").write_text("pos\tgreat wonderful film\nneg\tboring awful mess\npos\tunseen words great\n")


def test_text_data_become_token_ids_with_a_training_vocabulary(tmp_path):
    write_text_data(tmp_path)
    splits = data.load({"name": "text", "root": str(tmp_path), "max_length": 6, "vocab_size": 50})
    assert splits.train.class_names == ["neg", "pos"] and splits.train.inputs.shape == (60, 6)
    inputs, labels = splits.test.batch(torch.arange(3))
    assert inputs.dtype == torch.long and labels.tolist() == [1, 0, 1]
    vocabulary = splits.train.vocabulary
    assert vocabulary[:2] == ["<pad>", "<unk>"] and inputs[2, 0].item() == 1  # "unseen" is unknown
    assert inputs[0, 3].item() == 0  # padded


def test_a_text_run_trains_and_attacks_in_embedding_space(tmp_path):
    from advframe.runner import Run
    from advframe.testing import make_host, tiny_config

    write_text_data(tmp_path)
    host = make_host()
    config = tiny_config(host, "erm", ["data.name=text", f"data.root={tmp_path}", "data.max_length=6",
                                       "data.train_size=null", "data.test_size=null", "model.name=text-classifier",
                                       "model.args={embedding_dim: 16, channels: 16}", "train.epochs=10",
                                       "attack.eps=2.0", "attack.norm=l2",
                                       "eval.attacks=[{name: test-pgd, steps: 10, alpha: 0.5}]"])
    run = Run.start(host, config, tmp_path / "run")
    assert run.ctx.input_bounds is None
    metrics = run.execute()["metrics"]
    assert metrics["clean_accuracy"] == 1.0 and metrics["robust_accuracy"] < 1.0
    with pytest.raises(Exception, match="use model.name=text-classifier"):
        Run.start(host, tiny_config(host, "erm", ["data.name=text", f"data.root={tmp_path}", "model.name=mlp"]),
                  tmp_path / "mlp")
