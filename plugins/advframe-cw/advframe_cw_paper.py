"""``cw-paper``: CW-L2 with Carlini & Wagner's own optimiser settings (Carlini & Wagner, "Towards
Evaluating the Robustness of Neural Networks", IEEE S&P 2017, arXiv:1608.04644; the defaults of
carlini/nn_robust_attacks ``l2_attack.py``): up to 10,000 Adam iterations per binary-search step at
learning rate 0.01, 9 binary-search steps on ``c`` from 0.001, abort early, confidence 0.

The attack is ``cw``'s with ``norm: l2`` (``advframe_cw.cw_l2``: tanh space, binary search, ``eps`` as a
cap, see that module); only the defaults differ. It is a name of its own rather than a switch inside
``cw`` because evaluation labels are made from an entry's name, norm, eps and ``steps`` before any
plugin runs: ``{name: cw-paper, norm: l2, eps: 1.0}`` is labelled ``cw-paper-l2-1-10000``, ``cw``'s
capped default ``cw-l2-1-100``. A switch in ``cw`` would have run 10,000 steps under a label that says 100.

Cost: at most ``binary_search_steps x steps`` = 90,000 forward and backward passes per example (``cw``'s
defaults: 900). Abort early checks every ``steps / 10`` = 1,000 iterations and ends a search step whose
objective fell by less than 0.01% since the last check, so a search step runs at least 1,001
iterations unless ``stop_on_success`` freezes the example: 9,009 per example at the least.

L2 only: another norm is an error (the CW loss inside PGD is ``cw`` with ``norm: linf``). With
``eval.evaluators: [cw-paper]`` the ``evaluate`` hook reports the uncapped distances with these
settings as ``cw_paper_l2/success_rate``, ``cw_paper_l2/median_distance``, ``cw_paper_l2/mean_distance``
and ``cw_paper_l2/attacked_examples`` (``cw``'s evaluator, ``cw_l2/*``, with the paper's settings).

Settings (``plugins.cw-paper``, or per use in ``attack`` / ``eval.attacks``), with defaults::

    steps: 10000               # Adam iterations per binary-search step (the reference's MAX_ITERATIONS)
    lr: 0.01                   # Adam learning rate in tanh space (LEARNING_RATE)
    binary_search_steps: 9     # searches on c (BINARY_SEARCH_STEPS)
    initial_const: 0.001       # first c (INITIAL_CONST)
    abort_early: true          # ABORT_EARLY
    confidence: 0.0            # kappa (CONFIDENCE)
    targeted: false            # true: the labels passed are the target classes (the reference's default is true)
    stop_on_success: false     # true: freeze an example at its first success inside the eps cap
"""

from __future__ import annotations

import advframe_cw

from advframe import PluginError, hookimpl

DEFAULTS = {key: advframe_cw.PAPER.get(key, advframe_cw.DEFAULTS[key]) for key in advframe_cw.L2_KEYS}


def check(params: dict) -> None:
    if params["norm"] != "l2":
        raise PluginError(f"cw-paper is CW-L2 and takes norm: l2 (e.g. {{name: cw-paper, norm: l2, eps: 1.0}}), "
                          f"got norm {params['norm']!r}; the CW loss inside PGD is cw with norm: {params['norm']}")
    advframe_cw.check(params)


@hookimpl
def default_config():
    return dict(DEFAULTS)


@hookimpl
def generate_perturbation(model, inputs, labels, params):
    check(params)
    return advframe_cw.attack_l2(model, inputs, labels, params)


@hookimpl
def evaluate(model, dataset, ctx):
    """``cw``'s uncapped distances with the paper's settings; only when ``cw-paper`` is an evaluator."""
    if "cw-paper" not in ctx.config["eval"]["evaluators"]:
        return {}
    settings = {**ctx.settings, "norm": "l2"}
    check(settings)
    return advframe_cw.distance_metrics(model, dataset, ctx, settings, "cw_paper_l2")
