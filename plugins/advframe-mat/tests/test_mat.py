import advframe_mat
import pytest
import torch
import torch.nn.functional as F

from advframe import PluginError, checkpoint, hookimpl
from advframe.attacks import pgd
from advframe.context import make_optimizer
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run


class RecordingPGD:
    """``recorder``: PGD that remembers which model it attacked, under which norm, and what it returned."""

    __name__ = "tests.RecordingPGD"

    def __init__(self):
        self.calls = []

    @hookimpl
    def default_config(self):
        return {"alpha": 0.04, "steps": 3}

    @hookimpl
    def generate_perturbation(self, model, inputs, labels, params, ctx):
        alpha = params["alpha"] if params["alpha"] is not None else 2.5 * params["eps"] / params["steps"]
        adversarial = pgd(model, inputs, labels, eps=params["eps"], alpha=alpha, steps=params["steps"],
                          norm=params["norm"], generator=ctx.generator)
        self.calls.append({"model": model, "norm": params["norm"], "eps": params["eps"], "output": adversarial})
        return adversarial


def start(tmp_path, overrides=(), recorder=None, name="run"):
    plugins = [(advframe_mat, "mat")] + ([(recorder, "recorder")] if recorder else [])
    host = make_host(*plugins)
    overrides = [*overrides, "attack.name=recorder"] if recorder else list(overrides)
    return host, Run.start(host, tiny_config(host, "mat", overrides), tmp_path / name)


def one_batch(run, size=16):
    return run.splits.train.batch(torch.arange(size), run.ctx.device)


def members(run):
    return [run.model] + [run.ctx.models[name] for name in advframe_mat.peer_names(run.config["plugins"]["mat"]["models"])]


def test_contract(tmp_path):
    assert_conforms(advframe_mat, "mat", tmp_path)


def test_alpha_zero_gives_bitwise_the_first_step_of_independent_pgd_at(tmp_path):
    _, run = start(tmp_path, ["plugins.mat.alpha=0", "plugins.mat.models=3"])
    ctx = run.ctx
    inputs, labels = one_batch(run)
    nets = members(run)
    # independent PGD-AT: a copy of each model, its own optimizer, the same random starts
    copies = []
    for net in nets:
        copy = ctx.build_model()
        copy.load_state_dict(net.state_dict())
        copy.train()
        copies.append(copy)
    generator_state = ctx.generator.get_state()
    for net in nets:
        net.train()
    loss = ctx.call("training_step", "mat", model=run.train_model, batch=(inputs, labels),
                    optimizer=ctx.optimizers["model"], perturb=ctx.perturb)["loss"]
    ctx.step(loss)

    ctx.generator.set_state(generator_state)
    for copy in copies:
        optimizer = make_optimizer(copy.parameters(), run.config["train"])
        adversarial = ctx.attack(copy, inputs, labels)  # what pgd-at's perturb does
        optimizer.zero_grad()
        F.cross_entropy(copy(adversarial), labels).backward()
        optimizer.step()
    for net, copy in zip(nets, copies):
        for (key, ours), theirs in zip(net.state_dict().items(), copy.state_dict().values()):
            assert torch.equal(ours, theirs), key


def test_each_model_learns_from_the_peers_adversarial_examples(tmp_path):
    recorder = RecordingPGD()
    _, run = start(tmp_path, ["plugins.mat.alpha=0.5", "plugins.mat.models=3"], recorder)
    inputs, labels = one_batch(run)
    nets = members(run)
    seen = {id(net): [] for net in nets}
    hooks = [net.register_forward_pre_hook(lambda module, args: seen[id(module)].append(args[0].detach().clone())
                                           if module.training else None) for net in nets]
    recorder.calls.clear()
    run.ctx.call("training_step", "mat", model=run.train_model, batch=(inputs, labels),
                 optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    for hook in hooks:
        hook.remove()
    # one attack per model, each on that model
    assert [call["model"] for call in recorder.calls] == nets
    own = [call["output"] for call in recorder.calls]
    assert not torch.equal(own[0], own[1])
    for net in nets:  # in train mode every model ran on every model's adversarial examples
        for adversarial in own:
            assert any(torch.equal(adversarial, x) for x in seen[id(net)])

    # without the peers' examples a model sees only its own
    recorder.calls.clear()
    seen = {id(net): [] for net in nets}
    run.config["plugins"]["mat"]["include_peer_adv"] = False
    hooks = [net.register_forward_pre_hook(lambda module, args: seen[id(module)].append(args[0].detach().clone())
                                           if module.training and torch.is_grad_enabled() else None) for net in nets]
    run.ctx.call("training_step", "mat", model=run.train_model, batch=(inputs, labels),
                 optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    for hook in hooks:
        hook.remove()
    own = [call["output"] for call in recorder.calls]
    for index, net in enumerate(nets):
        assert len(seen[id(net)]) == 1 and torch.equal(seen[id(net)][0], own[index])


def test_peer_soft_labels_are_detached_and_distillation_changes_the_gradient(tmp_path):
    _, run = start(tmp_path)
    inputs, labels = one_batch(run)
    nets = members(run)
    settings = dict(run.config["plugins"]["mat"])
    adversarial = [[run.ctx.attack(net, inputs, labels)] for net in nets]
    losses, _ = advframe_mat.mutual_losses(nets, inputs, labels, adversarial, settings)
    losses[0].backward()
    assert all(p.grad is None for p in nets[1].parameters()), "model 0's loss reached its peer"
    with_peers = [p.grad.clone() for p in nets[0].parameters()]
    for net in nets:
        net.zero_grad(set_to_none=True)
    losses, _ = advframe_mat.mutual_losses(nets, inputs, labels, adversarial, {**settings, "alpha": 0.0})
    losses[0].backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(with_peers, nets[0].parameters()))


def test_specialists_are_attacked_under_their_own_norm(tmp_path):
    recorder = RecordingPGD()
    _, run = start(tmp_path, ["plugins.mat.models=3", "plugins.mat.norms=[linf, l2, l1]",
                              "plugins.mat.norm_eps=[0.1, 1.0, 4.0]", "attack.alpha=0.04"], recorder)
    inputs, labels = one_batch(run)
    recorder.calls.clear()
    run.ctx.call("training_step", "mat", model=run.train_model, batch=(inputs, labels),
                 optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    assert [(c["norm"], c["eps"]) for c in recorder.calls] == [("linf", 0.1), ("l2", 1.0), ("l1", 4.0)]
    delta = [(c["output"] - inputs).flatten(1) for c in recorder.calls]
    # steps of 2.5 eps / steps under their own norm: the L-inf step (0.04) would move 0.12 at most
    assert delta[1].norm(dim=1).max() > 0.5 and delta[2].abs().sum(1).max() > 0.5


def test_the_generalist_trains_on_every_norm_and_learns_from_each_specialist(tmp_path):
    recorder = RecordingPGD()
    _, run = start(tmp_path, ["plugins.mat.models=3", "plugins.mat.generalist=true", "plugins.mat.norms=[linf, l2]",
                              "plugins.mat.norm_eps=[0.1, 1.0]"], recorder)
    inputs, labels = one_batch(run)
    nets = members(run)
    seen = {id(net): [] for net in nets}
    hooks = [net.register_forward_pre_hook(lambda module, args: seen[id(module)].append(args[0].detach().clone())
                                           if module.training and torch.is_grad_enabled() else None) for net in nets]
    recorder.calls.clear()
    run.ctx.call("training_step", "mat", model=run.train_model, batch=(inputs, labels),
                 optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    for hook in hooks:
        hook.remove()
    # model 0, the generalist, is attacked under both norms; each specialist under its own
    assert [(nets.index(c["model"]), c["norm"]) for c in recorder.calls] == [(0, "linf"), (0, "l2"), (1, "linf"), (2, "l2")]
    out = [c["output"] for c in recorder.calls]
    held = lambda net, x: any(torch.equal(x, y) for y in seen[id(net)])
    assert all(held(nets[0], x) for x in out)  # the generalist trains on every set
    assert held(nets[1], out[3]) and held(nets[2], out[2])  # specialists learn from each other ...
    assert not held(nets[1], out[0]) and not held(nets[2], out[1])  # ... not from the generalist
    # the teachers of the generalist: specialist k on norm k's examples
    assert advframe_mat.teachers(0, 3, run.config["plugins"]["mat"]) == [(1, [(0, 0), (1, 0)]), (2, [(0, 1), (2, 0)])]


def test_resume_restores_every_model_and_optimizer(tmp_path):
    class Crash:
        __name__ = "tests.Crash"

        @staticmethod
        @hookimpl(wrapper=True)
        def training_step(ctx):
            if ctx.global_step == 4:  # second epoch, after the state saved at the end of the first
                raise RuntimeError("killed")
            return (yield)

    overrides = ["train.epochs=2", "train.optimizer=adam", "plugins.mat.models=3"]
    host = make_host((advframe_mat, "mat"))
    whole = Run.start(host, tiny_config(host, "mat", overrides), tmp_path / "whole")
    whole.train()

    crashing = make_host((advframe_mat, "mat"), (Crash(), "crash"))
    run = Run.start(crashing, tiny_config(crashing, "mat", overrides), tmp_path / "killed")
    with pytest.raises(Exception, match="killed"):
        run.train()
    state, _ = checkpoint.load_tensors(tmp_path / "killed" / "state.safetensors")
    assert any(k.startswith("weights/peer2/") for k in state) and any(k.startswith("optim/peer2.state.") for k in state)
    resumed = Run.resume(host, tmp_path / "killed")
    assert resumed.epoch == 1 and set(resumed.ctx.optimizers) == {"model", "peer1", "peer2"}
    resumed.train()
    expected, _ = checkpoint.load_tensors(tmp_path / "whole" / "model.safetensors")
    actual, _ = checkpoint.load_tensors(tmp_path / "killed" / "model.safetensors")
    assert expected.keys() == actual.keys() and any(k.startswith("peer1/") for k in actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    for name in ("model", "peer1", "peer2"):
        ours, theirs = whole.ctx.optimizers[name].state_dict(), resumed.ctx.optimizers[name].state_dict()
        for index in ours["state"]:
            for key, value in ours["state"][index].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs["state"][index][key])), (name, key)


def test_evaluate_reports_each_model_the_ensemble_and_the_union(tmp_path):
    user = {"eval": {"attacks": [{"name": "test-pgd", "steps": 3},
                                 {"name": "test-pgd", "steps": 3, "norm": "l2", "eps": 1.0, "alpha": 0.4}],
                     "batch_size": 64, "cascade": False}}
    results = tiny_run(advframe_mat, "mat", tmp_path / "run", user=user)
    metrics = results["metrics"]
    assert metrics["model0/robust_accuracy"] == metrics["robust_accuracy"]  # model 0 is the run's model
    for prefix in ("model0", "model1", "ensemble", "mean_model"):
        union = metrics[f"{prefix}/robust_accuracy"]  # the worst case over both threat models
        assert 0 <= union <= metrics[f"{prefix}/robust_accuracy/test-pgd-l2-1-3"]
        assert union <= metrics[f"{prefix}/robust_accuracy/test-pgd-linf-0.1-3"]
        assert union <= metrics[f"{prefix}/clean_accuracy"]
    assert metrics["mean_model/clean_accuracy"] == pytest.approx(
        (metrics["model0/clean_accuracy"] + metrics["model1/clean_accuracy"]) / 2)
    assert 0 <= metrics["peer_agreement"] <= 1 and 0 <= metrics["transfer_robust_accuracy"] <= 1


@pytest.mark.parametrize("override, message", [
    ("plugins.mat.models=1", "models must be >= 2"),
    ("plugins.mat.alpha=1.5", "alpha must be in"),
    ("plugins.mat.base_loss=mart", "base_loss must be"),
    ("plugins.mat.norms=[linf, l2]", "one entry per model"),
    ("plugins.mat.generalist=true", "generalist: true needs norms"),
])
def test_bad_settings_say_what_to_change(tmp_path, override, message):
    with pytest.raises(PluginError, match=message):
        start(tmp_path, [override])


def test_trades_base_loss_uses_the_kl_attack_and_the_clean_term(tmp_path):
    _, run = start(tmp_path, ["plugins.mat.base_loss=trades", "plugins.mat.alpha=0", "plugins.mat.trades_beta=2.0"])
    inputs, labels = one_batch(run)
    nets = members(run)
    settings = dict(run.config["plugins"]["mat"])
    adversarial = [[advframe_mat.adversarial_examples(net, inputs, labels, run.ctx.attack_params, settings, run.ctx)]
                   for net in nets]
    losses, _ = advframe_mat.mutual_losses(nets, inputs, labels, adversarial, settings)
    for net, own, loss in zip(nets, adversarial, losses):
        clean = net(inputs)
        expected = F.cross_entropy(clean, labels) + 2.0 * F.kl_div(
            F.log_softmax(net(own[0]), 1), F.softmax(clean, 1), reduction="batchmean")
        torch.testing.assert_close(loss, expected)


def batch_norms(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_teacher_soft_labels_come_from_eval_mode_passes_that_leave_batchnorm_alone(tmp_path):
    _, run = start(tmp_path, ["plugins.mat.alpha=0.5", "plugins.mat.temperature=2.0"])
    inputs, labels = one_batch(run)
    nets = members(run)
    assert all(batch_norms(net) for net in nets), "the test needs models with BatchNorm"
    adversarial = [[run.ctx.attack(net, inputs, labels)] for net in nets]
    for net in nets:
        net.train()
    def copy(net, train):  # the state every pass of this step starts from
        twin = run.ctx.build_model()
        twin.load_state_dict(net.state_dict())
        return twin.train(train)

    before = [copy(net, True) for net in nets]
    settings = dict(run.config["plugins"]["mat"])
    losses, _ = advframe_mat.mutual_losses(nets, inputs, labels, adversarial, settings)

    # expected: soft labels of the teacher in eval mode (running statistics), the student in train mode
    x0, x1 = adversarial[0][0], adversarial[1][0]
    students = [copy(net, True) for net in before]
    with torch.no_grad():
        soft = [[copy(net, False)(x) for x in (x0, x1)] for net in before]
    for i, j in ((0, 1), (1, 0)):
        own, peer = students[i](adversarial[i][0]), students[i](adversarial[j][0])
        logits = {i: own, j: peer}
        mutual = sum(advframe_mat.softened_kl(logits[k], soft[j][k], 2.0) for k in (0, 1))
        expected = 0.5 * F.cross_entropy(own, labels) + 0.5 * mutual
        torch.testing.assert_close(losses[i], expected)
    # the teacher passes moved no running statistic: each model's statistics moved exactly as its two
    # train-mode passes as a student (its own examples, then the peer's) move them
    for net, student in zip(nets, students):
        assert net.training
        for ours, theirs in zip(batch_norms(net), batch_norms(student)):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
            torch.testing.assert_close(ours.running_var, theirs.running_var)
            assert ours.num_batches_tracked == theirs.num_batches_tracked


def test_a_teacher_pass_leaves_the_model_as_it_found_it(tmp_path):
    _, run = start(tmp_path)
    inputs, _ = one_batch(run)
    net = members(run)[1]
    net.train()
    statistics = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batch_norms(net)]
    soft = advframe_mat.teacher_predictions(net, inputs)
    assert not soft.requires_grad and net.training and all(m.training for m in net.modules())
    for bn, (mean, var) in zip(batch_norms(net), statistics):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    net.eval()
    with torch.no_grad():
        assert torch.equal(soft, net(inputs))


def test_the_default_trains(tmp_path):
    """Both models at the shipped defaults end far above chance (10 classes) on clean digits."""
    results = tiny_run(advframe_mat, "mat", tmp_path / "run",
                       ["data.train_size=600", "data.test_size=200", "train.epochs=4", "plugins.mat.agreement=false"])
    metrics = results["metrics"]
    assert metrics["model0/clean_accuracy"] > 0.5 and metrics["model1/clean_accuracy"] > 0.5, metrics
