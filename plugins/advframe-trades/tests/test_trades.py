import torch

import advframe_trades
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run

SETTINGS = ["data.train_size=1000", "data.test_size=300", "train.epochs=6", "train.lr=0.005",
            "model.args={width: 16, hidden: 64}", "attack.eps=0.15", "attack.steps=5", "attack.alpha=0.05",
            "eval.attacks=[{name: test-pgd, steps: 10, alpha: 0.03}]", "train.monitor_examples=0"]


def test_contract(tmp_path):
    assert_conforms(advframe_trades, "trades", tmp_path)


def test_trades_beats_plain_training_and_beta_trades_accuracy_for_robustness(tmp_path):
    low = tiny_run(advframe_trades, "trades", tmp_path / "b0", SETTINGS + ["plugins.trades.beta=0.1"])["metrics"]
    high = tiny_run(advframe_trades, "trades", tmp_path / "b6", SETTINGS + ["plugins.trades.beta=6"])["metrics"]
    plain = tiny_run(advframe_trades, "trades", tmp_path / "erm", SETTINGS + ["train.method=erm"])["metrics"]
    assert high["robust_accuracy"] > plain["robust_accuracy"] + 0.2
    assert high["robust_accuracy"] > low["robust_accuracy"]
    assert low["clean_accuracy"] >= high["clean_accuracy"] - 0.02


def test_the_loss_is_natural_ce_plus_beta_times_the_boundary_kl(tmp_path):
    host = make_host((advframe_trades, "trades"))
    run = Run.start(host, tiny_config(host, "trades", ["plugins.trades.beta=2", "attack.steps=0",
                                                       "plugins.trades.random_start=zero"]), tmp_path / "r")
    inputs, labels = run.splits.train.batch(torch.arange(16))
    run.model.train()
    output = run.ctx.call("training_step", "trades", model=run.model, batch=(inputs, labels),
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    # with no attack steps and no random start x' = x, so the KL term vanishes
    assert abs(output["robust_loss"]) < 1e-6
    assert torch.isclose(output["loss"], torch.tensor(output["natural_loss"]), atol=1e-5)
