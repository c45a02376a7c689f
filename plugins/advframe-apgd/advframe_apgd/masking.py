"""``gradient-masking``: an evaluator that looks for the signs of gradient masking, so a robust accuracy
measured with gradient-based attacks is not trusted blindly.

The flags are the ones AutoAttack raises (fra31/auto-attack ``autoattack/checks.py``: zero gradients,
randomised outputs, probabilities instead of logits, Square stronger than the white-box attacks), the
one ART's ``art.metrics.gradient_check`` raises (zero, NaN or infinite input gradients), and the
checklist of Athalye et al. ("Obfuscated Gradients Give a False Sense of Security", ICML 2018,
arXiv:1802.00420) and Carlini et al. ("On Evaluating Adversarial Robustness", arXiv:1902.06705):
one-step attacks stronger than iterative ones, black-box and transfer attacks stronger than white-box
ones, random sampling finding adversarial examples that gradients miss, accuracy not falling to about
zero when the budget is large, and, for a randomized model, an attack that averages its gradient over
the randomness (EOT, Athalye et al. section 4.2) stronger than one that does not. Each flag is a float
(1 = raised, 0 = not, NaN = not checked) next to the numbers it was computed from;
``gradient_masking/any_flag`` is 1 when any flag is raised. Add it with ``eval.evaluators:
[gradient-masking]``; the results land in ``results.json`` with every other metric.

The threat model is the run's (``attack.eps``, ``attack.norm``). Robust accuracies count an example as
robust only if its clean input is classified correctly. Measurements, on ``max_examples`` evaluation
examples (a fixed random subset: evaluation splits are often sorted by class):

* white-box: PGD (``steps`` steps, step 2.5 eps / steps, uniform start, stop on success) and FGSM
  (one step of size eps from the clean input) on cross-entropy, and APGD-DLR (``apgd_steps`` steps;
  the DLR loss does not care how the logits are scaled); the white-box robust accuracy is the
  per-example worst case of PGD and APGD-DLR, and the black-box and noise flags compare against it;
* large budget: the same PGD with eps x ``large_eps_factor`` (L-inf capped at 1);
* random noise: ``random_samples`` uniform draws in the ball per example;
* black box: the ``black_box`` attack plugin (default ``square``, with AutoAttack's settings: 5,000
  queries, p_init 0.8; another plugin with its own settings), through ``ctx.attack``, when installed; the flag is NaN and ``black_box_available`` 0 when it is not;
* transfer: with ``surrogate`` (a run directory, loaded with ``advframe.runner.load_trained_model``),
  the same PGD (all ``steps``, no early stop) run white-box on the surrogate and its adversarial
  examples classified by the evaluated model; compared with the white-box robust accuracy. The
  surrogate must take the same inputs and classes. NaN when ``surrogate`` is null;
* EOT: when the two clean forward passes differ for some example of a batch (a randomized model), the
  same PGD on the expectation over ``eot_samples`` forward passes (the mean cross-entropy of the
  passes, so each step follows the gradient averaged over them; it stops when the passes' mean
  log-probabilities misclassify), compared with plain PGD; NaN for a deterministic model or
  ``eot_samples: 0``. Every attack's result is classified by one forward pass, as the clean input;
* gradients of the cross-entropy at uniform random points of the ball (where attacks start), and two
  clean forward passes (randomised model?) and the output range (probabilities?).

Settings (``plugins.gradient-masking``), with defaults::

    steps: 20                    # PGD steps of the white-box and large-budget attacks
    apgd_steps: 100              # APGD-DLR steps (0 skips it: the white-box reference is then PGD alone)
    tolerance: 0.01              # how much lower (accuracy) a weaker attack must be to raise a flag
    large_eps_factor: 4.0        # the large budget, as a multiple of eps
    large_eps_max_accuracy: 0.05 # robust accuracy above this at the large budget raises a flag
    random_samples: 10           # noise draws per example
    black_box: square            # attack plugin for the black-box comparison; "" skips it
    surrogate: null              # run directory of a surrogate model for the transfer check; null skips it
    eot_samples: 20              # forward passes averaged per EOT-PGD step (randomized models; 0 skips it)
    max_examples: 500            # evaluation examples checked (0: all)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import misclassified, pgd, random_delta
from advframe.data import SPLIT_SEED
from advframe.runner import load_trained_model
from advframe_apgd import NORMS, apgd

DEFAULTS = {
    "steps": 20,
    "apgd_steps": 100,
    "tolerance": 0.01,
    "large_eps_factor": 4.0,
    "large_eps_max_accuracy": 0.05,
    "random_samples": 10,
    "black_box": "square",
    "surrogate": None,
    "eot_samples": 20,
    "max_examples": 500,
}
PREFIX = "gradient_masking/"
SQUARE_AS_AUTOATTACK = {"budget": 5000, "p_init": 0.8}


@hookimpl
def default_config():
    return dict(DEFAULTS)


def check(settings: dict) -> None:
    if settings["steps"] < 1 or settings["apgd_steps"] < 0 or settings["large_eps_factor"] <= 1 \
            or settings["random_samples"] < 0:
        raise PluginError("gradient-masking: steps must be >= 1, apgd_steps >= 0, large_eps_factor > 1 and "
                          "random_samples >= 0")
    if not 0 <= settings["large_eps_max_accuracy"] <= 1 or settings["tolerance"] < 0:
        raise PluginError("gradient-masking: large_eps_max_accuracy must be in [0, 1] and tolerance >= 0")
    if settings["eot_samples"] < 0:
        raise PluginError(f"gradient-masking: eot_samples must be >= 0, got {settings['eot_samples']}")
    if settings["surrogate"] is not None and not isinstance(settings["surrogate"], str):
        raise PluginError(f"gradient-masking: surrogate must be a run directory or null, got {settings['surrogate']!r}")


def input_gradients(model, inputs, labels) -> torch.Tensor:
    with torch.enable_grad():
        points = inputs.detach().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(points), labels, reduction="sum"), points)
    return grad.flatten(1)


def black_box_settings(ctx, name: str) -> dict | None:
    if not name:
        return None
    if name not in ctx.host.available("attack"):
        warnings.warn(f"gradient-masking: the black-box attack {name!r} is not installed; the black-box "
                      f"flag is not checked (NaN)", stacklevel=2)
        return None
    # Square as AutoAttack runs it (5,000 queries, p_init 0.8): a weaker black box hides masking
    return ctx.attack_settings(name, **(SQUARE_AS_AUTOATTACK if name == "square" else {}))


def load_surrogate(ctx, path: str | None, dataset) -> nn.Module | None:
    """The surrogate run's model (eval mode, frozen), checked to take the evaluated inputs and classes."""
    if not path:
        return None
    surrogate = load_trained_model(ctx.host, Path(path).expanduser(), ctx.device).to(ctx.device)
    for parameter in surrogate.parameters():
        parameter.requires_grad_(False)
    inputs, _ = dataset.batch(torch.arange(1), ctx.device)
    try:
        with torch.no_grad():
            classes = surrogate(inputs).shape[-1]
    except RuntimeError as error:
        raise PluginError(f"gradient-masking: the surrogate {path} does not take the evaluated inputs "
                          f"({tuple(inputs.shape[1:])}): {error}") from error
    if classes != ctx.num_classes:
        raise PluginError(f"gradient-masking: the surrogate {path} has {classes} classes, the evaluated model "
                          f"{ctx.num_classes}")
    return surrogate


class Expectation(nn.Module):
    """The mean log-probabilities of ``samples`` forward passes of a randomized model (EOT): their
    negative log-likelihood is the mean cross-entropy of the passes, so its gradient is the average of
    the passes' gradients."""

    def __init__(self, model: nn.Module, samples: int):
        super().__init__()
        self.model, self.samples = model, samples

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.log_softmax(self.model(inputs), 1) for _ in range(self.samples)]).mean(0)


def expected_cross_entropy(log_probabilities, labels, clean_logits):
    return F.nll_loss(log_probabilities, labels, reduction="none")


def measure(model, inputs, labels, settings, ctx, black_box, surrogate=None) -> dict[str, torch.Tensor]:
    """Per example of one batch: which attacks leave it correctly classified, and its gradient health."""
    eps, norm, steps = ctx.attack_params["eps"], ctx.attack_params["norm"], settings["steps"]
    large = eps * settings["large_eps_factor"]
    large = min(large, 1.0) if norm == "linf" else large
    generator = ctx.generator
    with torch.no_grad():
        logits = model(inputs)
        again = model(inputs)
    correct = ~misclassified(logits, labels)

    def survives(adversarial):
        with torch.no_grad():
            return correct & ~misclassified(model(adversarial), labels)

    row = {"clean": correct}
    row["pgd"] = survives(pgd(model, inputs, labels, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm,
                              stop_on_success=True, generator=generator))
    row["white_box"] = row["pgd"].clone()
    if settings["apgd_steps"] and ctx.num_classes >= 3 and norm in NORMS:
        row["white_box"] &= survives(apgd(model, inputs, labels, eps=eps, norm=norm, steps=settings["apgd_steps"],
                                          loss="dlr", generator=generator).adversarial)
    row["fgsm"] = survives(pgd(model, inputs, labels, eps=eps, alpha=eps, steps=1, norm=norm, random_start="zero"))
    row["large"] = survives(pgd(model, inputs, labels, eps=large, alpha=2.5 * large / steps, steps=steps, norm=norm,
                                stop_on_success=True, generator=generator))
    noise = correct.clone()
    for _ in range(settings["random_samples"]):
        noise &= survives(inputs + random_delta(inputs, eps, norm, "uniform", generator))
    row["noise"] = noise
    if black_box is not None:
        row["black_box"] = survives(ctx.attack(model, inputs, labels, black_box))
    if surrogate is not None:  # no early stop: examples just past the surrogate's boundary transfer badly
        row["transfer"] = survives(pgd(surrogate, inputs, labels, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                                       norm=norm, generator=generator))
    grad = input_gradients(model, inputs + random_delta(inputs, eps, norm, "uniform", generator), labels)
    row["zero_gradient"] = grad.abs().sum(1) == 0
    row["nonfinite_gradient"] = ~torch.isfinite(grad).all(1)
    scale = logits.norm(dim=1, keepdim=True).clamp_min(1e-10)
    row["randomized"] = ((logits - again).norm(dim=1, keepdim=True) / scale).squeeze(1) > 1e-4
    # EOT where this batch shows randomness; on a deterministic batch it is plain PGD (one pass is the mean)
    row["eot_checked"] = row["randomized"].any().expand(len(inputs)) & (settings["eot_samples"] > 0)
    row["eot"] = row["pgd"]
    if row["eot_checked"].any():
        row["eot"] = survives(pgd(Expectation(model, settings["eot_samples"]), inputs, labels, eps=eps,
                                  alpha=2.5 * eps / steps, steps=steps, norm=norm, loss=expected_cross_entropy,
                                  stop_on_success=True, generator=generator))
    row["probabilities"] = ((logits.min(1).values > -1e-5) & (logits.max(1).values < 1 + 1e-5)
                            & ((logits.sum(1) - 1).abs() < 1e-5))
    return row


def flags(rates: dict[str, float], settings: dict) -> dict[str, float]:
    tolerance, nan = settings["tolerance"], float("nan")
    result = {
        "flag_single_step_stronger": float(rates["fgsm"] < rates["pgd"] - tolerance),
        "flag_random_noise_stronger": float(rates["noise_not_white_box"] > tolerance),
        "flag_black_box_stronger": float(rates["black_box"] < rates["white_box"] - tolerance)
        if "black_box" in rates else nan,
        "flag_transfer_stronger": float(rates["transfer"] < rates["white_box"] - tolerance)
        if "transfer" in rates else nan,
        "flag_eot_stronger": float(rates["eot"] < rates["pgd"] - tolerance) if rates["eot_checked"] > 0 else nan,
        "flag_large_eps_not_broken": float(rates["large"] > settings["large_eps_max_accuracy"]),
        "flag_zero_gradients": float(rates["zero_gradient"] > 0),
        "flag_nonfinite_gradients": float(rates["nonfinite_gradient"] > 0),
        "flag_randomized_model": float(rates["randomized"] > 0),
        "flag_probability_outputs": float(rates["probabilities"] == 1.0),
    }
    result["any_flag"] = float(any(v == 1.0 for v in result.values()))
    return result


@hookimpl
def evaluate(model, dataset, ctx):
    settings = ctx.settings
    check(settings)
    if settings["max_examples"] and settings["max_examples"] < len(dataset):
        # a fixed random subset, not the first examples: evaluation splits are often sorted by class
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SPLIT_SEED))
        dataset = dataset.subset(order[: settings["max_examples"]].sort().values)
    black_box = black_box_settings(ctx, settings["black_box"])
    surrogate = load_surrogate(ctx, settings["surrogate"], dataset)
    rows: dict[str, list[torch.Tensor]] = {}
    for inputs, labels in dataset.batches(ctx.config["eval"]["batch_size"], ctx.device):
        for key, value in measure(model, inputs, labels, settings, ctx, black_box, surrogate).items():
            rows.setdefault(key, []).append(value.cpu())
    per_example = {key: torch.cat(values) for key, values in rows.items()}
    per_example["noise_not_white_box"] = per_example["white_box"] & ~per_example["noise"]
    rates = {key: value.float().mean().item() for key, value in per_example.items()}
    eps = ctx.attack_params["eps"]
    large = eps * settings["large_eps_factor"]
    metrics = {
        "clean_accuracy": rates["clean"],
        "pgd_robust_accuracy": rates["pgd"],
        "white_box_robust_accuracy": rates["white_box"],
        "fgsm_robust_accuracy": rates["fgsm"],
        "random_noise_robust_accuracy": rates["noise"],
        "random_noise_beats_white_box_fraction": rates["noise_not_white_box"],
        "large_eps": min(large, 1.0) if ctx.attack_params["norm"] == "linf" else large,
        "large_eps_robust_accuracy": rates["large"],
        "black_box_available": float(black_box is not None),
        "black_box_robust_accuracy": rates.get("black_box", math.nan),
        "transfer_robust_accuracy": rates.get("transfer", math.nan),
        "eot_pgd_robust_accuracy": rates["eot"] if rates["eot_checked"] > 0 else math.nan,
        "zero_gradient_fraction": rates["zero_gradient"],
        "nonfinite_gradient_fraction": rates["nonfinite_gradient"],
        "examples": float(len(dataset)),
        **flags(rates, settings),
    }
    return {PREFIX + key: value for key, value in metrics.items()}
