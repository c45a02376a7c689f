"""``bregman-at``: FAIT and MER (Wu, Gao, Zhou, Guo and Zhang, "Lower Difficulty and Better
Robustness: A Bregman Divergence Perspective for Adversarial Training", arXiv:2208.12511, v2 2024;
no official code was published).

The KL divergence between a one-hot label and a softmax output is the Bregman divergence of the
negative-entropy function, so adversarial training slides training points along the
negative-entropy curve. PGD-AT makes one long trip (one-hot -> p(x')); TRADES splits it into
one-hot -> p(x) (cross-entropy) and p(x) -> p(x') (KL), which is easier to optimise and, the paper
argues, why it is more robust under a 10-step PGD adversary. The paper proposes two methods, both
selectable here (``method``):

* ``fait``: decouple the robust term further, into S shorter segments along the adversarial path
  x = x_0, x_1, ..., x_S = x'::

      L = CE(f(x), y) + beta * sum_{s=1..S} KL(p(x_{s-1}) || p(x_s))

  ``path: interpolation`` puts x_s = x + (s / S)(x' - x) on the straight line to the 10-step PGD
  point; ``path: iterates`` takes the PGD iterate after round(s K / S) of its K steps. Gradients flow
  through every intermediate output (nothing is detached). With S = 1 this is TRADES exactly.
* ``mer``: maximise the entropy of the prediction on top of TRADES (higher-entropy models are
  easier robustness learners)::

      L = CE(f(x), y) + beta * KL(p(x) || p(x')) - lambda * H(p(x))

  ``entropy_on`` applies the entropy term to the clean prediction (default), the adversarial one
  or both. With lambda = 0 this is TRADES exactly.

The inner maximisation is TRADES' KL attack (sign-gradient ascent on KL(p(x) || p(x')) from a
0.001 N(0, I) start, eps / step size / steps from the ``attack`` section; the default training
attack is PGD-10, the paper's adversary), with the model in eval mode; the outer loss runs in train
mode. For text (token ids) the walk runs in the model's embedding space, as the core's attacks do.
The paper's full text was not available to us: the exact FAIT path (interpolation vs. iterates), how
its segments are weighted, and which prediction MER's entropy term acts on are reconstructions kept
behind the ``path``, ``segment_reduction`` and ``entropy_on`` switches.

Settings (``plugins.bregman-at``)::

    method: fait                 # fait | mer
    beta: 6.0                    # weight of the robust (KL) term, as TRADES
    random_start: normal         # start of the KL attack: normal (TRADES) | uniform | zero
    segments: 2                  # FAIT: S, the number of KL segments (1 = TRADES)
    path: interpolation          # FAIT: interpolation | iterates  [reconstruction]
    segment_reduction: sum       # FAIT: sum | mean of the S segment KLs  [reconstruction]
    entropy_weight: 0.3          # MER: lambda (0 = TRADES)
    entropy_on: clean            # MER: clean | adversarial | both  [reconstruction]

``evaluate`` reports the mechanism MER relies on: the mean prediction entropy (nats) on clean test
inputs and on the first evaluation attack's adversarial inputs (shared, cached predictions), and
the mean confidence of the predicted class on clean inputs. It works for any trained model, so
``eval.evaluators=[bregman-at]`` adds the same columns to PGD-AT and TRADES runs in a bench.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import pgd, step_size
from advframe.losses import entropy, kl_to_clean
from advframe.models import unwrap

METHODS = ("fait", "mer")
PATHS = ("interpolation", "iterates")
REDUCTIONS = ("sum", "mean")
ENTROPY_ON = ("clean", "adversarial", "both")
STARTS = ("normal", "uniform", "zero")


@hookimpl
def default_config():
    return {
        "method": "fait",
        "beta": 6.0,
        "random_start": "normal",
        "segments": 2,
        "path": "interpolation",
        "segment_reduction": "sum",
        "entropy_weight": 0.3,
        "entropy_on": "clean",
    }


def _choice(settings, key, choices):
    value = settings[key]
    if value not in choices:
        raise PluginError(f"bregman-at: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_settings(settings) -> None:
    _choice(settings, "method", METHODS)
    _choice(settings, "path", PATHS)
    _choice(settings, "segment_reduction", REDUCTIONS)
    _choice(settings, "entropy_on", ENTROPY_ON)
    _choice(settings, "random_start", STARTS)
    if settings["segments"] < 1:
        raise PluginError(f"bregman-at: segments must be >= 1 (1 = TRADES), got {settings['segments']}")
    if settings["entropy_weight"] < 0:
        raise PluginError(f"bregman-at: entropy_weight must be >= 0 (it maximises entropy), got "
                          f"{settings['entropy_weight']}")


def adversarial_path(model, inputs, labels, ctx) -> list[torch.Tensor]:
    """The points x_1, ..., x_S of the adversarial path (x_S is the K-step KL-PGD point).

    MER and FAIT with one segment use a single point: the TRADES adversarial example.
    """
    settings, attack = ctx.settings, ctx.attack_params
    segments = settings["segments"] if settings["method"] == "fait" else 1
    run = {"eps": attack["eps"], "alpha": step_size(attack), "norm": attack["norm"], "loss": "kl",
           "generator": ctx.generator, "bounds": ctx.input_bounds}
    if not inputs.dtype.is_floating_point:  # token ids: the walk is in the model's embedding space
        with torch.no_grad():
            inputs = unwrap(model).embed(inputs)
    steps = attack["steps"]
    if segments > 1 and settings["path"] == "iterates":
        # the same K-step walk, cut at round(s K / S): each piece starts where the last one stopped
        points, done, current = [], 0, None
        for s in range(1, segments + 1):
            target = round(s * steps / segments)
            current = pgd(model, inputs, labels, steps=target - done, random_start=settings["random_start"],
                          init=None if current is None else current - inputs, **run)
            points.append(current)
            done = target
        return points
    adversarial = pgd(model, inputs, labels, steps=steps, random_start=settings["random_start"], **run)
    return [inputs + (s / segments) * (adversarial - inputs) for s in range(1, segments)] + [adversarial]


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    settings = ctx.settings
    check_settings(settings)
    points = adversarial_path(model, inputs, labels, ctx)
    clean_logits = model(inputs)
    natural = F.cross_entropy(clean_logits, labels)
    logs = {}
    if settings["method"] == "fait":
        logits = [clean_logits] + [model(point) for point in points]
        segment_kl = [kl_to_clean(logits[s], logits[s - 1]).mean() for s in range(1, len(logits))]
        robust = torch.stack(segment_kl).sum()
        if settings["segment_reduction"] == "mean":
            robust = robust / len(segment_kl)
        adversarial_logits = logits[-1]
        if len(segment_kl) > 1:
            logs.update({f"segment_{s + 1}_kl": kl.item() for s, kl in enumerate(segment_kl)})
        loss = natural + settings["beta"] * robust
    else:
        adversarial_logits = model(points[-1])
        robust = kl_to_clean(adversarial_logits, clean_logits).mean()
        on = settings["entropy_on"]
        bonus = torch.zeros((), device=inputs.device)
        if on in ("clean", "both"):
            bonus = bonus + entropy(clean_logits).mean()
        if on in ("adversarial", "both"):
            bonus = bonus + entropy(adversarial_logits).mean()
        loss = natural + settings["beta"] * robust - settings["entropy_weight"] * bonus
        logs["entropy_term"] = bonus.item()
    return {
        "loss": loss,
        "natural_loss": natural.item(),
        "robust_loss": robust.item(),
        "clean_entropy": entropy(clean_logits.detach()).mean().item(),
        "adversarial_accuracy": (adversarial_logits.argmax(1) == labels).float().mean().item(),
        **logs,
    }


@hookimpl
def evaluate(model, dataset, ctx):
    clean = ctx.predictions(model, dataset)
    metrics = {
        "mean_prediction_entropy": entropy(clean.logits).mean().item(),
        "mean_clean_confidence": clean.logits.softmax(1).amax(1).mean().item(),
    }
    attacks = ctx.config["eval"]["attacks"]
    if attacks:
        adversarial = ctx.predictions(model, dataset, attacks[0])
        metrics["mean_adversarial_entropy"] = entropy(adversarial.logits).mean().item()
    return metrics
