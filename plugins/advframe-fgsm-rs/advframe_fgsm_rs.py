"""``fgsm-rs``: FGSM adversarial training with a random start (Wong, Rice and Kolter, "Fast is
better than free: Revisiting adversarial training", ICLR 2020, arXiv:2001.03994; code:
locuslab/fast_adversarial, ``CIFAR10/train_fgsm.py``).

One FGSM step from a uniformly random start inside the eps ball replaces PGD's inner maximisation;
with a step of 1.25 eps it reaches PGD-level robustness at two gradient evaluations per example (one
for the attack, one for the update) instead of PGD-k's k + 1::

    delta_0 ~ U(-eps, eps)  (projected so x + delta_0 lies in [0, 1])
    delta   = project(delta_0 + alpha * sign(grad_delta CE(f(x + delta_0), y))),  alpha = 1.25 eps
    minimise CE(f(x + delta), y)

Eps and norm come from the ``attack`` section; the attack's step count and step size are not used
(this is one step of size ``step_factor * eps``). The attack gradient is taken with the model in
eval mode, as every advframe attack is (the official code stays in train mode).

Catastrophic overfitting guard (the official ``--early-stop``, on by default here). FGSM training can
suddenly lose all PGD robustness while FGSM accuracy stays high. After every epoch the guard runs
PGD (``guard_steps`` steps of ``guard_step_factor * eps``, uniform start, per-example early stop, the
model in eval mode) on a fixed guard batch: the first ``guard_examples`` images of the validation
split when ``data.validation_size > 0``, else the first ``guard_examples`` training images of the run
(the official code uses the first training batch), kept in ``ctx.state``. If the PGD accuracy has
dropped by more than ``guard_threshold`` (absolute) below the reference (``best``: the best check so
far; ``previous``: the last check, as the official code), the weights (and optimizer state) saved at
the last passing check are restored and, with ``guard: stop`` (official), the model is not updated
again; ``guard: rollback`` restores and keeps training. The checks run at the start of every epoch
after the first (so the epoch line of ``metrics.jsonl`` shows ``guard_pgd_accuracy`` of the weights
after the previous epoch, ``guard_triggered`` = 1 once it fired, ``guard_stopped``) and once more after
the last step of the run; ``evaluate`` reports ``guard_triggered`` (times it fired),
``guard_trigger_epoch`` (epochs done when it first fired, 0 = never), ``guard_checks``,
``guard_last_pgd_accuracy`` and ``guard_best_pgd_accuracy``. The guard's PGD counts as training cost
(it is part of the method). Every check's randomness is seeded by the run's seed and the epoch, so a
resumed run makes the same decisions.

Settings (``plugins.fgsm-rs``)::

    step_factor: 1.25         # FGSM step alpha = step_factor * eps (paper: 1.25; >= 2 overfits catastrophically)
    random_start: uniform     # uniform (the method) | zero (plain FGSM training) | normal
    guard: stop               # stop (official) | rollback | none (no guard)
    guard_threshold: 0.2      # absolute drop in guard PGD accuracy that counts as a collapse (official 0.2)
    guard_reference: best     # best (best check so far) | previous (last check, the official rule)
    guard_steps: 5            # PGD steps of the check (official 5)
    guard_step_factor: 0.25   # PGD step = guard_step_factor * eps (official 2/255 at eps 8/255)
    guard_examples: 128       # size of the guard batch (official: one training batch of 128)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advframe import PluginError, data, distributed, hookimpl
from advframe.attacks import pgd
from advframe.models import eval_mode, unwrap

CHOICES = {"random_start": ("uniform", "zero", "normal"), "guard": ("stop", "rollback", "none"),
           "guard_reference": ("best", "previous")}
POSITIVE = ("step_factor", "guard_step_factor", "guard_steps", "guard_examples")


@hookimpl
def default_config():
    return {"step_factor": 1.25, "random_start": "uniform", "guard": "stop", "guard_threshold": 0.2,
            "guard_reference": "best", "guard_steps": 5, "guard_step_factor": 0.25, "guard_examples": 128}


def check_settings(settings: dict) -> None:
    for key, choices in CHOICES.items():
        if settings[key] not in choices:
            raise PluginError(f"fgsm-rs: {key} must be one of {', '.join(choices)}, got {settings[key]!r}")
    for key in POSITIVE:
        if settings[key] <= 0:
            raise PluginError(f"fgsm-rs: {key} must be > 0, got {settings[key]!r}")
    if not 0 < settings["guard_threshold"] <= 1:
        raise PluginError(f"fgsm-rs: guard_threshold is an absolute accuracy drop in (0, 1], "
                          f"got {settings['guard_threshold']!r}")


# -- the guard's state, all in ctx.state (restored on --resume) ------------------------------------

def _scalar(ctx, key: str, default: float = 0.0) -> float:
    value = ctx.state.get(f"guard/{key}")
    return float(value) if value is not None else default


def _set(ctx, key: str, value: float) -> None:
    ctx.state[f"guard/{key}"] = torch.tensor(float(value))


def _optimizer_parameters(ctx):
    return [p for group in ctx.optimizers["model"].param_groups for p in group["params"]]


def save_snapshot(model, ctx) -> None:
    """Weights, buffers and optimizer state of the passing check, to restore after a collapse."""
    for key in [k for k in ctx.state if k.startswith(("guard/weights/", "guard/optim/"))]:
        del ctx.state[key]
    for key, value in unwrap(model).state_dict().items():
        ctx.state[f"guard/weights/{key}"] = value.detach().clone()
    optimizer = ctx.optimizers["model"]
    for index, parameter in enumerate(_optimizer_parameters(ctx)):
        for key, value in optimizer.state.get(parameter, {}).items():
            if isinstance(value, torch.Tensor):
                ctx.state[f"guard/optim/{index}/{key}"] = value.detach().clone()


def restore_snapshot(model, ctx) -> None:
    prefix = "guard/weights/"
    weights = {k[len(prefix):]: v for k, v in ctx.state.items() if k.startswith(prefix)}
    unwrap(model).load_state_dict(weights)
    optimizer, parameters = ctx.optimizers["model"], _optimizer_parameters(ctx)
    for key, value in ctx.state.items():
        if key.startswith("guard/optim/"):
            index, name = key[len("guard/optim/"):].split("/", 1)
            slot = optimizer.state.get(parameters[int(index)])
            if slot is not None and name in slot:
                slot[name].copy_(value)


def guard_batch(ctx):
    inputs, labels = ctx.state.get("guard/inputs"), ctx.state.get("guard/labels")
    return (None, None) if inputs is None else (inputs, labels.long())


def collect_guard_batch(ctx, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Keep the first ``guard_examples`` training images of the run (when there is no validation split)."""
    wanted = ctx.settings["guard_examples"]
    held, held_labels = guard_batch(ctx)
    have = 0 if held is None else len(held)
    if have >= wanted:
        return
    take = inputs[: wanted - have].detach().clone(), labels[: wanted - have].detach().clone()
    ctx.state["guard/inputs"] = take[0] if held is None else torch.cat([held, take[0]])
    ctx.state["guard/labels"] = take[1] if held is None else torch.cat([held_labels, take[1]])


def guard_accuracy(model, ctx, epoch: int) -> float:
    """PGD accuracy on the guard batch (over all ranks under torchrun)."""
    settings, attack = ctx.settings, ctx.attack_params
    inputs, labels = guard_batch(ctx)
    generator = torch.Generator().manual_seed(ctx.config["seed"] * 1009 + 31 * epoch + 17)
    eps = attack["eps"]
    adversarial = pgd(model, inputs, labels, eps=eps, alpha=settings["guard_step_factor"] * eps,
                      steps=settings["guard_steps"], norm=attack["norm"], random_start="uniform",
                      stop_on_success=True, generator=generator)
    with torch.no_grad(), eval_mode(unwrap(model)):
        correct = (unwrap(model)(adversarial).argmax(1) == labels).sum().item()
    total = distributed.sum_values({"correct": correct, "count": len(labels)})
    return total["correct"] / max(total["count"], 1)


def run_guard(model, ctx, epochs_done: int) -> None:
    """One check after ``epochs_done`` epochs: keep a snapshot, or restore it after a collapse."""
    settings = ctx.settings
    accuracy = guard_accuracy(model, ctx, epochs_done)
    checks = _scalar(ctx, "checks")
    reference = _scalar(ctx, "best" if settings["guard_reference"] == "best" else "previous")
    collapsed = checks > 0 and accuracy < reference - settings["guard_threshold"]
    if collapsed:
        restore_snapshot(model, ctx)
        if _scalar(ctx, "triggered") == 0:
            _set(ctx, "trigger_epoch", epochs_done)
        _set(ctx, "triggered", _scalar(ctx, "triggered") + 1)
        _set(ctx, "previous", _scalar(ctx, "snapshot_accuracy"))
        if settings["guard"] == "stop":
            _set(ctx, "stopped", 1)
    else:
        save_snapshot(model, ctx)
        _set(ctx, "snapshot_accuracy", accuracy)
        _set(ctx, "previous", accuracy)
        _set(ctx, "best", max(accuracy, _scalar(ctx, "best")) if checks > 0 else accuracy)
    _set(ctx, "last", accuracy)
    _set(ctx, "checks", checks + 1)
    _set(ctx, "checked_epochs", epochs_done)


# -- hooks -------------------------------------------------------------------------------------------

@hookimpl
def setup(ctx):
    settings = ctx.settings
    check_settings(settings)
    if settings["guard"] != "none" and ctx.config["data"]["validation_size"] > 0:
        validation = data.load(ctx.config["data"]).validation
        inputs, labels = validation.batch(slice(0, settings["guard_examples"]), ctx.device)
        ctx.state["guard/inputs"], ctx.state["guard/labels"] = inputs, labels


def fgsm_rs(model, inputs, labels, settings, ctx):
    """The FGSM-RS adversarial examples of one batch."""
    eps, norm = ctx.attack_params["eps"], ctx.attack_params["norm"]
    return pgd(model, inputs, labels, eps=eps, alpha=settings["step_factor"] * eps, steps=1, norm=norm,
               random_start=settings["random_start"], loss="ce", generator=ctx.generator)


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    settings = ctx.settings
    check_settings(settings)
    guarded = settings["guard"] != "none"
    if guarded:
        if ctx.epoch == 0:
            collect_guard_batch(ctx, inputs, labels)
            _set(ctx, "batches", ctx.batch_index + 1)
        if ctx.epoch > 0 and ctx.batch_index == 0 and _scalar(ctx, "checked_epochs") < ctx.epoch \
                and not _scalar(ctx, "stopped"):
            run_guard(model, ctx, ctx.epoch)
    logs = {}
    if guarded and _scalar(ctx, "checks"):
        logs = {"guard_pgd_accuracy": _scalar(ctx, "last"), "guard_triggered": float(_scalar(ctx, "triggered") > 0),
                "guard_stopped": _scalar(ctx, "stopped")}
    if _scalar(ctx, "stopped"):
        # stopped by the guard: no forward pass, no update (nothing is counted as work)
        idle = torch.zeros((), device=inputs.device, requires_grad=True)
        ctx.step(idle, models=[])
        return {"loss": idle, **logs}
    adversarial = fgsm_rs(model, inputs, labels, settings, ctx)
    logits = model(adversarial)
    loss = F.cross_entropy(logits, labels)
    ctx.step(loss)
    last_step = ctx.epoch == ctx.data_passes - 1 and ctx.batch_index == int(_scalar(ctx, "batches")) - 1
    if guarded and last_step and ctx.epoch > 0:
        run_guard(model, ctx, ctx.epoch + 1)  # the run's last epoch is checked too
    return {"loss": loss, "adversarial_accuracy": (logits.argmax(1) == labels).float().mean().item(), **logs}


@hookimpl
def evaluate(ctx):
    if ctx.settings["guard"] == "none" or "guard/checks" not in ctx.state:
        return {}
    return {
        "guard_triggered": _scalar(ctx, "triggered"),
        "guard_trigger_epoch": _scalar(ctx, "trigger_epoch"),
        "guard_checks": _scalar(ctx, "checks"),
        "guard_last_pgd_accuracy": _scalar(ctx, "last"),
        "guard_best_pgd_accuracy": _scalar(ctx, "best"),
    }
