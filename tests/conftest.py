import os

import pytest

os.environ.setdefault("ADVFRAME_PROGRESS", "0")

# command-line settings for a run that takes a second
TINY = ["--set", "data.name=digits", "--set", "data.train_size=64", "--set", "data.test_size=32",
        "--set", "model.args={width: 8, hidden: 16}", "--set", "train.epochs=1", "--set", "train.batch_size=32",
        "--set", "attack.name=test-pgd", "--set", "eval.attacks=[{name: test-pgd, steps: 2}]",
        "--set", "train.monitor_examples=0"]


@pytest.fixture
def host():
    """Built-ins and the reference attack, no installed entry points: tests never depend on them."""
    from advframe.testing import make_host

    return make_host()


@pytest.fixture
def tiny_args():
    return list(TINY)
