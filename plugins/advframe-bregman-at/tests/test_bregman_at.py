import copy
import importlib.util

import advframe_bregman_at
import pytest
import torch
import torch.nn.functional as F

from advframe import PluginError
from advframe.attacks import pgd, step_size
from advframe.losses import kl_to_clean
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run

NAME = "bregman-at"


@pytest.mark.parametrize("method", ["fait", "mer"])
def test_contract(tmp_path, method):
    assert_conforms(advframe_bregman_at, NAME, tmp_path, overrides=[f"plugins.{NAME}.method={method}"])


def test_contract_fait_iterates(tmp_path):
    assert_conforms(advframe_bregman_at, NAME, tmp_path,
                    overrides=[f"plugins.{NAME}.path=iterates", f"plugins.{NAME}.segments=3"])


def make_run(tmp_path, overrides):
    host = make_host((advframe_bregman_at, NAME))
    config = tiny_config(host, NAME, [f"plugins.{NAME}.{o}" for o in overrides])
    run = Run.start(host, config, tmp_path / "run")
    inputs, labels = run.splits.train.batch(torch.arange(32), run.ctx.device)
    run.model.train()
    return run, inputs, labels


def plugin_loss(run, inputs, labels, seed=0):
    run.ctx.generator.manual_seed(seed)
    output = run.ctx.call("training_step", NAME, model=run.model, batch=(inputs, labels),
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    return output["loss"]


def trades_reference(run, inputs, labels, beta, seed=0):
    """TRADES' loss written out from the core primitives (as advframe-trades computes it)."""
    run.ctx.generator.manual_seed(seed)
    attack = run.ctx.attack_params
    adversarial = pgd(run.model, inputs, labels, eps=attack["eps"], alpha=step_size(attack), steps=attack["steps"],
                      norm=attack["norm"], random_start="normal", loss="kl", generator=run.ctx.generator)
    clean_logits = run.model(inputs)
    return F.cross_entropy(clean_logits, labels) + beta * kl_to_clean(run.model(adversarial), clean_logits).mean()


@pytest.mark.parametrize("overrides", [["method=mer", "entropy_weight=0.0"], ["method=fait", "segments=1"],
                                       ["method=fait", "segments=1", "path=iterates"]])
def test_reduces_to_trades_exactly(tmp_path, overrides):
    run, inputs, labels = make_run(tmp_path, [*overrides, "beta=4.0"])
    state = copy.deepcopy(run.model.state_dict())  # train-mode passes move BatchNorm statistics
    ours = plugin_loss(run, inputs, labels)
    run.model.load_state_dict(state)
    reference = trades_reference(run, inputs, labels, beta=4.0)
    assert torch.equal(ours, reference)
    if importlib.util.find_spec("advframe_trades") is not None:  # and the TRADES plugin itself, where installed
        import advframe_trades

        run.model.load_state_dict(state)
        run.ctx.generator.manual_seed(0)
        run.ctx.config["plugins"]["trades"] = {"beta": 4.0, "random_start": "normal"}
        run.ctx._plugin_stack.append("trades")
        try:
            trades = advframe_trades.training_step(model=run.model, batch=(inputs, labels), ctx=run.ctx)["loss"]
        finally:
            run.ctx._plugin_stack.pop()
        assert torch.equal(ours, trades)


def test_mer_entropy_term_changes_the_loss_by_lambda_times_entropy(tmp_path):
    run, inputs, labels = make_run(tmp_path, ["method=mer", "entropy_weight=0.0"])
    state = copy.deepcopy(run.model.state_dict())
    base = plugin_loss(run, inputs, labels)
    run.model.load_state_dict(state)
    run.ctx.config["plugins"][NAME]["entropy_weight"] = 0.5
    run.ctx.generator.manual_seed(0)
    output = run.ctx.call("training_step", NAME, model=run.model, batch=(inputs, labels),
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    assert output["entropy_term"] > 0
    assert torch.allclose(output["loss"], base - 0.5 * output["entropy_term"], atol=1e-5)


def test_fait_splits_the_robust_term_into_segments(tmp_path):
    """Two segments through the midpoint: the sum of the segment KLs differs from the single TRADES KL,
    and each segment is logged."""
    run, inputs, labels = make_run(tmp_path, ["method=fait", "segments=2"])
    run.ctx.generator.manual_seed(0)
    output = run.ctx.call("training_step", NAME, model=run.model, batch=(inputs, labels),
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    assert output["segment_1_kl"] > 0 and output["segment_2_kl"] > 0
    assert output["robust_loss"] == pytest.approx(output["segment_1_kl"] + output["segment_2_kl"], rel=1e-5)


def test_mean_prediction_entropy_rises_with_lambda(tmp_path):
    """A small MER run: the entropy term makes the trained model less confident on the test set."""
    entropies = []
    for weight in (0.0, 2.0):
        results = tiny_run(advframe_bregman_at, NAME, tmp_path / f"mer-{weight}",
                           overrides=[f"plugins.{NAME}.method=mer", f"plugins.{NAME}.entropy_weight={weight}",
                                      f"plugins.{NAME}.beta=1.0", "attack.steps=1", "data.train_size=160",
                                      "train.epochs=5", "train.lr=0.02", "train.monitor_examples=0", "eval.attacks=[]"])
        entropies.append(results["metrics"]["mean_prediction_entropy"])
    assert entropies[1] > entropies[0] + 0.05


@pytest.mark.parametrize("setting", ["method=madry", "segments=0", "path=straight", "entropy_weight=-1.0"])
def test_bad_settings_raise_one_clear_error(tmp_path, setting):
    run, inputs, labels = make_run(tmp_path, [setting])
    with pytest.raises(PluginError, match="bregman-at"):
        plugin_loss(run, inputs, labels)


@pytest.mark.parametrize("overrides", [["method=mer"], ["method=fait", "path=iterates"]])
def test_text_runs_walk_in_embedding_space(tmp_path, overrides):
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "poor", "awful", "dull"]}
    rows = [f"{label}\t{a} {b}" for label, pool in words.items() for a in pool for b in pool]
    (tmp_path / "train.tsv").write_text("\n".join(rows * 2) + "\n")
    (tmp_path / "test.tsv").write_text("pos\tgood nice\nneg\tbad dull\n")
    results = tiny_run(advframe_bregman_at, NAME, tmp_path / "run", overrides=[
        "data.name=text", f"data.root={tmp_path}", "data.max_length=4", "data.train_size=null", "data.test_size=null",
        "model.name=text-classifier", "model.args={embedding_dim: 8, channels: 8}", "attack.eps=1.0",
        "attack.norm=l2", "train.monitor_examples=0", "eval.attacks=[{name: test-pgd, steps: 3, alpha: 0.5}]",
        *[f"plugins.{NAME}.{o}" for o in overrides]])
    assert results["metrics"]["mean_prediction_entropy"] > 0
