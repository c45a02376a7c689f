"""``simba``: Simple Black-box Attack (Guo, Gardner, You, Wilson and Weinberger, "Simple Black-box
Adversarial Attacks", ICML 2019, arXiv:1905.07121; code: cg563/simple-blackbox-attack).

SimBA walks along orthonormal directions q taken one at a time without replacement: try
``x - step * q``; keep it if the probability of the true class falls (of the target rises,
targeted); otherwise try ``x + step * q``; otherwise leave x. One or two queries per direction.

* ``basis: pixel``: q are single pixels in random order (SimBA).
* ``basis: dct``: q are the orthonormal 2-D DCT-II basis images of the whole image (the official
  code's block size equals the image size), low frequencies first (SimBA-DCT). ``order: strided``
  visits the top-left ``freq_dims`` x ``freq_dims`` frequencies in random order, then each band of
  ``stride`` further frequencies in random order; ``order: random`` visits only the top-left block.

Queries (all through :class:`advframe.cost.QueryCounter`, each counted, the budget included): one
on the clean input (it gives the starting probability and says whether the example counts:
initially misclassified examples, or in targeted mode examples already at the target, are not
attacked and not counted), one on ``x + init`` when another method seeds the attack, then one or
two per direction until the example succeeds or its budget is spent. Success is read from the
scores of the accepted candidate, so the official code's extra prediction query per iteration is
not needed; like the official code, this count includes the probes that are rejected.

The threat model is enforced after every step: the perturbation is projected into the ``eps`` ball
under ``norm`` (the official ``linf_bound`` clamp for L-inf, a rescale for L2) and into [0, 1].
When all directions have been tried (28 x 28 x 1 has only 784), a new random order of the same kind
starts (the official code stops there).

Seeding and continuing another method's count (``params["init"/"counter"/"counted"]``, also
arguments of :func:`simba_attack`): as for every query attack, see :func:`advframe.cost.run_query_attack`.

Settings (``plugins.simba`` or per use in ``attack`` / ``eval.attacks``), with defaults::

    budget: 1000       # queries per example, the clean query included
    basis: dct         # dct (SimBA-DCT) | pixel (SimBA)
    step: 0.2          # the step along each direction, in L2 (the official epsilon)
    freq_dims: 7       # DCT: side of the low-frequency block tried first (official: 28 of 224;
                       # 1/8 of 28 would be 3.5, so a quarter of the side, 49 directions)
    stride: 2          # DCT strided order: width of each further band (official: 7 of 224)
    order: strided     # DCT: strided | random (top-left freq_dims block only)
    targeted: false    # true: the labels passed are target classes
"""

from __future__ import annotations

import math

import torch

from advframe import PluginError, hookimpl
from advframe.attacks import misclassified, project
from advframe.cost import QueryBatch, QueryCounter, QueryResult, check_query_settings, run_query_attack

DEFAULTS = {"budget": 1000, "basis": "dct", "step": 0.2, "freq_dims": 7, "stride": 2, "order": "strided",
            "targeted": False}


@hookimpl
def default_config():
    return dict(DEFAULTS)


def dct_matrix(size: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix: row k is the k-th cosine basis vector of length ``size``."""
    positions = torch.arange(size, dtype=torch.float64)
    frequencies = torch.arange(size, dtype=torch.float64)[:, None]
    matrix = torch.cos(math.pi * (2 * positions + 1) * frequencies / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.float()


def coordinate_order(count: int, shape: tuple[int, int, int], basis: str, order: str, freq_dims: int,
                     stride: int, generator) -> torch.Tensor:
    """One visiting order per example over the flat coordinates (channel, row, column).

    Pixel basis: a random permutation of all coordinates. DCT: ``strided`` sorts frequencies by band
    (the top-left ``freq_dims`` block, then bands of ``stride``) and randomly within a band;
    ``random`` is a random permutation of the top-left block only.
    """
    c, h, w = shape
    keys = torch.rand(count, c * h * w, generator=generator)
    if basis == "pixel":
        return keys.argsort(1)
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    reach = torch.maximum(rows, cols).expand(c, h, w).flatten()
    if order == "random":
        inside = (reach < freq_dims).nonzero().squeeze(1)
        return inside[keys[:, inside].argsort(1)]
    band = torch.where(reach < freq_dims, 0, 1 + (reach - freq_dims).clamp_min(0) // stride)
    return (keys + band).argsort(1)


def directions(coordinates: torch.Tensor, shape: tuple[int, int, int], basis: str, dct: tuple | None) -> torch.Tensor:
    """Unit-norm basis images for one flat coordinate per example."""
    c, h, w = shape
    images = torch.zeros(len(coordinates), c, h, w)
    channel, rest = coordinates // (h * w), coordinates % (h * w)
    row, col = rest // w, rest % w
    picked = torch.arange(len(coordinates))
    if basis == "pixel":
        images[picked, channel, row, col] = 1.0
    else:
        rows_matrix, cols_matrix = dct
        images[picked, channel] = rows_matrix[row][:, :, None] * cols_matrix[col][:, None, :]
    return images


def check_settings(params: dict) -> None:
    check_query_settings("simba", params)
    if params["basis"] not in ("dct", "pixel"):
        raise PluginError(f"simba: basis must be dct or pixel, got {params['basis']!r}")
    if params["order"] not in ("strided", "random"):
        raise PluginError(f"simba: order must be strided or random, got {params['order']!r}")
    if params["step"] <= 0 or params["freq_dims"] < 1 or params["stride"] < 1:
        raise PluginError("simba: step must be > 0, freq_dims and stride >= 1")


def simba_attack(model, inputs, labels, *, eps: float, norm: str = "l2", budget: int = 1000, basis: str = "dct",
                 step: float = 0.2, freq_dims: int = 7, stride: int = 2, order: str = "strided",
                 targeted: bool = False, init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 counter: QueryCounter | None = None, counted: torch.Tensor | None = None) -> QueryResult:
    """Run SimBA / SimBA-DCT on one batch (inputs ``(N, C, H, W)`` in [0, 1]).

    :param init: a starting perturbation (projected into the ball); the walk starts there.
    :param counter: a :class:`QueryCounter` (probabilities) to continue another method's count.
    :param counted: which examples to attack, when the caller already knows it (no clean query).
    """
    if inputs.dim() != 4:
        raise PluginError(f"simba needs image batches (N, C, H, W), got shape {tuple(inputs.shape)}")
    generator = generator or torch.Generator().manual_seed(0)
    n, shape = len(inputs), tuple(inputs.shape[1:])
    batch = QueryBatch(model, inputs, labels, targeted=targeted, budget=budget, scores="probabilities",
                       attack="simba", counter=counter, counted=counted)
    inputs, labels, success = batch.inputs, batch.labels, batch.success
    delta = torch.zeros_like(inputs) if init is None else project(init.detach().to(inputs), inputs, eps, norm)
    probability = torch.zeros(n, device=inputs.device)
    if batch.clean_scores is not None:
        probability = batch.clean_scores.gather(1, labels[:, None]).squeeze(1)
    todo, scores = batch.start(delta, moved=init is not None)  # the walk's starting point
    if scores is not None:
        probability[todo] = scores.gather(1, labels[todo, None]).squeeze(1)
    sign = -1.0 if targeted else 1.0  # the walk lowers sign * probability
    dct = (dct_matrix(shape[1]), dct_matrix(shape[2])) if basis == "dct" else None
    visiting = coordinate_order(n, shape, basis, order, freq_dims, stride, generator)
    position = torch.zeros(n, dtype=torch.long)
    while len(todo := batch.active()):
        exhausted = todo[position[todo.cpu()] >= visiting.shape[1]].cpu()
        if len(exhausted):  # every direction tried: a fresh order of the same kind
            visiting[exhausted] = coordinate_order(len(exhausted), shape, basis, order, freq_dims, stride, generator)
            position[exhausted] = 0
        rows = todo.cpu()
        q = directions(visiting[rows, position[rows]], shape, basis, dct).to(inputs)
        position[rows] += 1
        improved = torch.zeros(len(todo), dtype=torch.bool, device=inputs.device)
        for direction in (-1.0, 1.0):
            if direction > 0:  # the + probe only where the - probe failed and budget is left
                keep = ~improved & (batch.counter.remaining(todo).to(inputs.device) > 0)
                todo, q = todo[keep], q[keep]
                if len(todo) == 0:
                    break
            x = inputs[todo]
            candidate = project(delta[todo] + direction * step * q, x, eps, norm)
            scores = batch.counter(x + candidate, todo)  # success only where the probe is kept
            new = scores.gather(1, labels[todo, None]).squeeze(1)
            improved = sign * new < sign * probability[todo]
            delta[todo[improved]] = candidate[improved]
            probability[todo[improved]] = new[improved]
            success[todo[improved]] = misclassified(scores[improved], labels[todo[improved]], targeted)
    return batch.result(delta)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    check_settings(params)
    return run_query_attack(simba_attack, model, inputs, labels, params, ctx, DEFAULTS)
