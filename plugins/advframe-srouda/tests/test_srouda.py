import json

import advframe_srouda
import pytest
import torch

from advframe import PluginError
from advframe.runner import DomainBatch, Run
from advframe.testing import assert_conforms, make_host, tiny_config

DA = ["data.name=mnist-to-digits", "data.train_size=96", "data.test_size=48", "data.target_ratio=2",
      "attack.eps=0.1", "attack.steps=2", "train.monitor_examples=0", "plugins.srouda.discriminator_hidden=32"]


def start(tmp_path, overrides, name="run"):
    host = make_host((advframe_srouda, "srouda"))
    return Run.start(host, tiny_config(host, "srouda", [*DA, *overrides]), tmp_path / name)


def domain_batch(run, size=16):
    inputs, labels = run.splits.train.batch(torch.arange(size))
    index = torch.arange(2 * size)
    target, _ = run.splits.target.batch(index)
    return DomainBatch(inputs, labels, target, index)


def one_step(run, batch):
    run.model.train()
    return run.ctx.call("training_step", "srouda", model=run.model, batch=batch,
                        optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)


def weights(run):
    return {**{f"model/{k}": v.clone() for k, v in run.model.state_dict().items()},
            **{f"{n}/{k}": v.clone() for n, m in run.ctx.models.items() for k, v in m.state_dict().items()}}


def test_contract(tmp_path):
    # plain classification data (no target): the source images stand in for the target, with a warning
    with pytest.warns(UserWarning, match="no unlabelled target"):
        assert_conforms(advframe_srouda, "srouda", tmp_path, ["train.epochs=2", "plugins.srouda.pretrain_epochs=1"])


def test_contract_with_dann_on_domain_adaptation_data(tmp_path):
    assert_conforms(advframe_srouda, "srouda", tmp_path, [*DA, "train.epochs=2", "plugins.srouda.pretrain_epochs=1",
                                                          "plugins.srouda.uda=dann"])


@pytest.mark.parametrize("uda", ["mdd", "dann"])
def test_garbage_target_labels_leave_training_unchanged(tmp_path, uda):
    host = make_host((advframe_srouda, "srouda"))
    config = tiny_config(host, "srouda", [*DA, "train.epochs=2", "plugins.srouda.pretrain_epochs=1",
                                          f"plugins.srouda.uda={uda}"])
    first = Run.start(host, config, tmp_path / "a")
    first.train()
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in logged] == [1.0, 2.0]
    assert all(0 <= line["pseudo_label_accuracy"] <= 1 for line in logged)
    second = Run(host, config, tmp_path / "b")
    second.out_dir.mkdir()
    second.splits.target.labels = torch.randint(0, 10, second.splits.target.labels.shape)
    second.train()
    a, b = weights(first), weights(second)
    assert set(a) == set(b) and any(k.startswith("teacher/") for k in a)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_the_meta_term_sign_changes_the_teacher_update_linearly(tmp_path):
    # plain SGD: the teacher's step is -lr * (g_uda + sign * h * g_meta), so the +1 and -1 steps straddle the 0 step
    settings = ["train.epochs=1", "plugins.srouda.pretrain_epochs=0", "train.optimizer=sgd", "train.momentum=0",
                "train.weight_decay=0", "plugins.srouda.teacher_lr=0.5", "plugins.srouda.threshold=0"]
    deltas, students, h = {}, {}, {}
    for sign in (1, -1, 0):
        run = start(tmp_path, [*settings, f"plugins.srouda.meta_sign={sign}"], f"sign{sign}")
        before = {k: v.clone() for k, v in run.ctx.models["teacher"].state_dict().items()}
        output = one_step(run, domain_batch(run))
        after = run.ctx.models["teacher"].state_dict()
        deltas[sign] = torch.cat([(after[k] - before[k]).flatten().float() for k in before])
        students[sign] = torch.cat([p.detach().flatten() for p in run.model.parameters()])
        h[sign] = output["meta_h"]
    assert h[1] == pytest.approx(-h[-1]) and h[1] != 0 and h[0] == 0
    assert not torch.allclose(deltas[1], deltas[0]) and not torch.allclose(deltas[-1], deltas[0])
    assert torch.allclose(deltas[1] + deltas[-1], 2 * deltas[0], atol=1e-4)
    # the student's step does not depend on the meta sign (it comes before the teacher's)
    assert torch.equal(students[1], students[-1]) and torch.equal(students[1], students[0])


def test_the_student_sees_only_adversarial_target_views_and_the_teacher_starts_from_pretraining(tmp_path):
    run = start(tmp_path, ["train.epochs=2", "plugins.srouda.pretrain_epochs=1", "plugins.srouda.strong_view=none"])
    run.ctx.epoch = 1  # the self-training phase
    first = next(run.model.parameters())
    original = first.detach().clone()
    with torch.no_grad():
        first.mul_(3)  # stands for pre-training: the teacher must start from these weights, not its setup copy
    pretrained = first.detach().clone()
    seen = []
    handle = run.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = domain_batch(run)
    try:
        one_step(run, batch)
    finally:
        handle.remove()
    assert seen, "the student was never called"
    clean_target = batch.target_inputs.flatten(1)
    for inputs in seen:
        distance = (inputs.flatten(1)[:, None] - clean_target[None]).abs().amax(2)
        assert (distance > 0).all(), "the student was given a clean target image"
    # with the identity strong view, the student's training inputs are perturbations of the target images
    adversarial = seen[-2][len(batch[0]):].flatten(1)  # the student's training forward: [source; adversarial]
    assert (adversarial - clean_target).abs().amax(1).max() <= 0.1 + 1e-5
    # the teacher took the pre-trained weights when the phase started (then one step of its own)
    assert run.ctx.state["self_training_started"].item() == 1
    teacher = next(run.ctx.models["teacher"].parameters()).detach()
    assert (teacher - pretrained).abs().max() < 1e-2 < (teacher - original).abs().max()


def test_naive_self_training_keeps_the_teacher_frozen(tmp_path):
    run = start(tmp_path, ["train.epochs=1", "plugins.srouda.pretrain_epochs=0", "plugins.srouda.mode=naive_self_training"])
    before = {k: v.clone() for k, v in run.ctx.models["teacher"].state_dict().items()}
    student = [p.detach().clone() for p in run.model.parameters()]
    output = one_step(run, domain_batch(run))
    for key, value in run.ctx.models["teacher"].state_dict().items():
        assert torch.equal(before[key], value), key
    assert any(not torch.equal(a, b) for a, b in zip(student, run.model.parameters()))
    assert "teacher_meta_loss" not in output and 0 <= output["pseudo_label_accuracy"] <= 1


def test_random_masking_zeroes_exactly_the_ratio_of_patches():
    images = torch.rand(5, 1, 16, 16) + 0.01
    masked = advframe_srouda.random_masking(images, 2, 0.5, torch.Generator().manual_seed(0))
    patches = masked.unfold(2, 2, 2).unfold(3, 2, 2).reshape(5, 64, 4)
    zero = (patches == 0).all(2)
    assert zero.sum(1).tolist() == [32] * 5
    kept = patches[~zero]
    assert torch.equal(kept, images.unfold(2, 2, 2).unfold(3, 2, 2).reshape(5, 64, 4)[~zero])
    with pytest.raises(PluginError, match="rma_patch"):
        advframe_srouda.random_masking(images, 3, 0.5, torch.Generator())


def test_randaugment_stays_in_the_box_and_changes_the_images():
    images = torch.rand(64, 1, 16, 16)
    strong = advframe_srouda.randaugment(images, 2, 10, torch.Generator().manual_seed(0))
    assert strong.shape == images.shape and strong.min() >= 0 and strong.max() <= 1
    changed = (strong - images).abs().flatten(1).amax(1) > 0
    assert changed.all()  # the final cutout always applies


@pytest.mark.parametrize("setting", ["plugins.srouda.mode=teacher", "plugins.srouda.meta_sign=2",
                                     "plugins.srouda.pretrain_epochs=2", "plugins.srouda.rma_ratio=1.0"])
def test_bad_settings_say_what_to_change(tmp_path, setting):
    with pytest.raises(PluginError, match="srouda: "):
        start(tmp_path, ["train.epochs=2", setting])


def test_a_run_resumed_between_the_phases_and_inside_phase_two_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    host = make_host((advframe_srouda, "srouda"))
    config = tiny_config(host, "srouda", [*DA, "train.epochs=3", "plugins.srouda.pretrain_epochs=1"])
    whole = Run.start(host, config, tmp_path / "whole")
    whole.train()

    class Stop(KeyboardInterrupt):  # passes through the plugin call like a user's Ctrl-C
        pass

    real = advframe_srouda.meta_step
    for stop_at in (1, 2):  # the first phase-2 step (state saved before the teacher copy), then inside phase 2
        def interrupted(*args, calls=[], stop_at=stop_at, **kwargs):  # noqa: B006 (a fresh list per stop_at)
            calls.append(1)
            if len(calls) == stop_at:
                raise Stop
            return real(*args, **kwargs)

        out = tmp_path / f"stopped{stop_at}"
        run = Run.start(host, {**config, "train": {**config["train"], "checkpoint_every": 1}}, out)
        monkeypatch.setattr(advframe_srouda, "meta_step", interrupted)
        with pytest.raises(Stop):
            run.train()
        monkeypatch.setattr(advframe_srouda, "meta_step", real)
        resumed = Run.resume(host, out)
        resumed.train()
        a, b = weights(whole), weights(resumed)
        for key, value in a.items():
            assert torch.equal(value, b[key]), (stop_at, key)
