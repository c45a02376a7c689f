"""``trades``: TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and
Accuracy", ICML 2019, arXiv:1901.08573; code: yaodongyu/TRADES).

The robust loss is split into natural cross-entropy and a boundary term that pulls the prediction at
the worst neighbour towards the clean prediction; beta trades one for the other::

    min  CE(f(x), y) + beta * max_{x' in B(x, eps)} KL(p(x) || p(x'))

The inner maximisation is sign-gradient ascent on the KL from a 0.001 N(0, I) start (eps, step size
and steps from the ``attack`` section), with the model in eval mode; the outer loss runs in train mode
and does not detach the clean logits, as in the official code.

Settings (``plugins.trades``)::

    beta: 6.0               # 1/lambda in the paper; larger = more robust, less accurate
    random_start: normal    # normal (official) | uniform | zero
"""

import torch.nn.functional as F

from advframe import hookimpl
from advframe.attacks import pgd, step_size
from advframe.losses import kl_to_clean


@hookimpl
def default_config():
    return {"beta": 6.0, "random_start": "normal"}


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    attack = ctx.attack_params
    adversarial = pgd(model, inputs, labels, eps=attack["eps"], alpha=step_size(attack), steps=attack["steps"],
                      norm=attack["norm"], random_start=ctx.settings["random_start"], loss="kl",
                      generator=ctx.generator)
    clean_logits = model(inputs)
    adversarial_logits = model(adversarial)
    natural = F.cross_entropy(clean_logits, labels)
    robust = kl_to_clean(adversarial_logits, clean_logits).mean()  # sum over classes / B, as the official code
    return {
        "loss": natural + ctx.settings["beta"] * robust,
        "natural_loss": natural.item(),
        "robust_loss": robust.item(),
        "adversarial_accuracy": (adversarial_logits.argmax(1) == labels).float().mean().item(),
    }
