"""``fgsm``: the fast gradient sign method (Goodfellow et al., ICLR 2015, arXiv:1412.6572), which is
PGD with one step of size eps and no random start. Same settings as ``pgd``, other defaults."""

from advframe import hookimpl

from advframe_pgd import DEFAULTS, run_pgd


@hookimpl
def default_config():
    return {**DEFAULTS, "steps": 1, "random_start": "zero"}


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    params = {**params, "alpha": params["eps"] if params["alpha"] is None else params["alpha"]}
    return run_pgd(model, inputs, labels, params, ctx)
