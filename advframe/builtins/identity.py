"""``none``: the identity attack (clean training or evaluation)."""

from advframe.hookspecs import hookimpl


@hookimpl
def generate_perturbation(inputs):
    return inputs.clone()
