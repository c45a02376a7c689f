import advframe_pgd_at
from advframe.testing import assert_conforms, tiny_run

SETTINGS = ["data.train_size=1000", "data.test_size=300", "train.epochs=6", "train.lr=0.005",
            "model.args={width: 16, hidden: 64}", "attack.eps=0.15", "attack.steps=5", "attack.alpha=0.05",
            "eval.attacks=[{name: test-pgd, steps: 10, alpha: 0.03}]", "train.monitor_examples=0"]


def test_contract(tmp_path):
    assert_conforms(advframe_pgd_at, "pgd-at", tmp_path)


def test_adversarial_training_beats_plain_training_under_attack(tmp_path):
    robust = tiny_run(advframe_pgd_at, "pgd-at", tmp_path / "at", SETTINGS)
    plain = tiny_run(advframe_pgd_at, "pgd-at", tmp_path / "erm", SETTINGS + ["train.method=erm"])
    assert robust["metrics"]["robust_accuracy"] > plain["metrics"]["robust_accuracy"] + 0.2
    # PGD-5 training: 5 attack passes and one training pass per example and epoch, counted by the core
    assert robust["cost"]["gradient_evaluations"] == 6 * 6 * 1000
