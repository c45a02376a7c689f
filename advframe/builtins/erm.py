"""``erm``: plain empirical risk minimisation (natural training), the baseline every defense beats."""

import torch.nn.functional as F

from advframe.hookspecs import hookimpl


@hookimpl
def training_step(model, batch):
    inputs, labels = batch
    logits = model(inputs)
    loss = F.cross_entropy(logits, labels)
    return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean().item()}
