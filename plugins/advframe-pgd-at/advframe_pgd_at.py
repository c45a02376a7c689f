"""``pgd-at``: adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, arXiv:1706.06083).

Robust optimisation: each minibatch is replaced by its worst case in the eps ball, found by the
run's training attack (``attack`` section, PGD by default), and the model minimises cross-entropy
on it. The baseline every other defense is compared against.

Settings (``plugins.pgd-at``)::

    clean_weight: 0.0   # weight of the clean loss mixed in (0 = Madry's pure adversarial training)
"""

import torch.nn.functional as F

from advframe import hookimpl


@hookimpl
def default_config():
    return {"clean_weight": 0.0}


@hookimpl
def training_step(model, batch, perturb, ctx):
    inputs, labels = batch
    adversarial = perturb(model, inputs, labels)
    logits = model(adversarial)
    loss = F.cross_entropy(logits, labels)
    weight = ctx.settings["clean_weight"]
    if weight:
        loss = (1 - weight) * loss + weight * F.cross_entropy(model(inputs), labels)
    return {"loss": loss, "adversarial_accuracy": (logits.argmax(1) == labels).float().mean().item()}
