"""``jsigr``: Jacobian norm with Selective Input Gradient Regularisation (D. Liu, L. Y. Wu, B. Li,
F. Boussaid, M. Bennamoun, X. Xie, C. Liang, "Jacobian norm with Selective Input Gradient
Regularization for interpretable adversarial defense", Pattern Recognition 145 (2024) 109902;
preprint: D. Liu, L. Wu, H. Zhao, F. Boussaid, M. Bennamoun, X. Xie, "Jacobian Norm with Selective
Input Gradient Regularization for Improved and Interpretable Adversarial Defense", arXiv:2207.13036;
code: github.com/Lywu-github/jJ-SIGR, which holds only the MI-FGSM transfer attack used to evaluate).

Adversarial training helps little against *transferred* adversarial examples and gives no
interpretable predictions. J-SIGR trains on clean data with two regularisers instead:

* the input-output Jacobian's Frobenius norm (linearised robustness), estimated with random
  projections (Hoffman et al. 2019): ||J||_F^2 = K E_v ||d(v . z)/dx||^2, v uniform on the unit
  sphere of the K logits;
* a selective input-gradient penalty: the gradient of log p_y is penalised only outside a
  perturbation-based saliency mask M(x) (the top ``mask_quantile`` of the input found by occluding
  patches, or by RISE's random masks), so the gradient explanation imitates the saliency map::

      L = CE(f(x), y) + lambda_J ||J_f(x)||_F^2 + lambda_S ||(1 - M(x)) * grad_x log p_y(x)||^2

Cost: the core counts the forward pass; the step reports the rest (``extra_passes``): the input
gradient is a second backward pass, backpropagated again (double backpropagation) when the saliency
penalty is on, and each Jacobian projection is both, so a default step costs 5 gradient evaluations
per example (1 + 2 + 2); the occlusion mask's probes are forward passes without a graph
(``forward_passes``, 17 per example for 28 x 28 inputs and 7 x 7 patches).

Both penalties are differentiated through (double backpropagation, ``create_graph=True``); the mask
is detached (computed without gradients, model in eval mode). With ``adversarial_weight`` w > 0 the
cross-entropy is taken on a mixture, (1 - w) CE(x) + w CE(x_adv), x_adv from the run's training
attack (the "mixture of corrupted and clean data" the abstract mentions). The paper's text was not
available to us and the official code has no training code: the exact regulariser form, weights and
mask are reconstructions, kept behind the settings below.

Settings (``plugins.jsigr``)::

    jacobian_weight: 0.05        # lambda_J
    saliency_weight: 1.0         # lambda_S
    projections: 1               # random projections per example for the Jacobian estimate
    mask_kind: occlusion         # occlusion | rise  (perturbation-based saliency)
    mask_quantile: 0.25          # fraction of the input marked salient (M = 1)
    occlusion_patch: 7           # occlusion: patch side (stride = patch), features per group for flat inputs
    rise_masks: 32               # rise: random masks per example
    rise_grid: 7                 # rise: cells per side of each random mask
    mask_refresh_epochs: 0       # 0: recompute masks every step with the current model;
                                 # N: cache each example's mask (by a hash of its input) for N epochs
    adversarial_weight: 0.0      # w: weight of CE on the training attack's examples (0 = clean only)
    eval_examples: 500           # test inputs used by evaluate's gradient metrics
    png_examples: 8              # test inputs drawn in jsigr_saliency.png

``evaluate`` reports, for any trained model (``eval.evaluators=[jsigr]`` adds them to other
methods' runs) and on a fixed random subset of ``eval_examples`` test inputs: the mean input-gradient
norm ``input_gradient_norm`` (||grad_x log p_y||_2), the mean Jacobian Frobenius norm
``jacobian_frobenius_norm`` (exact, one backward pass per class), and ``saliency_gradient_energy``,
the fraction of the squared input gradient that falls inside the saliency mask (``mask_quantile``
for a gradient that ignores the mask). On the main process of a run with a directory it writes
``jsigr_saliency.png``: inputs, perturbation saliency maps and the model's gradient maps side by side.
"""

from __future__ import annotations

import hashlib
import math
import weakref

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.data import SPLIT_SEED
from advframe.models import eval_mode

KINDS = ("occlusion", "rise")


@hookimpl
def default_config():
    return {
        "jacobian_weight": 0.05,
        "saliency_weight": 1.0,
        "projections": 1,
        "mask_kind": "occlusion",
        "mask_quantile": 0.25,
        "occlusion_patch": 7,
        "rise_masks": 32,
        "rise_grid": 7,
        "mask_refresh_epochs": 0,
        "adversarial_weight": 0.0,
        "eval_examples": 500,
        "png_examples": 8,
    }


def check_inputs(inputs: torch.Tensor) -> None:
    if not inputs.dtype.is_floating_point:
        raise PluginError("jsigr: the inputs are token ids; J-SIGR regularises gradients with respect to continuous "
                          "inputs (images or tabular features), so it cannot train a text model")


def check_settings(settings) -> None:
    for key in ("jacobian_weight", "saliency_weight", "mask_refresh_epochs", "eval_examples", "png_examples"):
        if settings[key] < 0:
            raise PluginError(f"jsigr: {key} must be >= 0, got {settings[key]}")
    for key in ("projections", "occlusion_patch", "rise_masks", "rise_grid"):
        if settings[key] < 1:
            raise PluginError(f"jsigr: {key} must be >= 1, got {settings[key]}")
    if settings["mask_kind"] not in KINDS:
        raise PluginError(f"jsigr: mask_kind must be one of {', '.join(KINDS)}, got {settings['mask_kind']!r}")
    if not 0.0 < settings["mask_quantile"] < 1.0:
        raise PluginError(f"jsigr: mask_quantile is a fraction in (0, 1), got {settings['mask_quantile']}")
    if not 0.0 <= settings["adversarial_weight"] <= 1.0:
        raise PluginError(f"jsigr: adversarial_weight is a fraction in [0, 1], got {settings['adversarial_weight']}")


# -- perturbation-based saliency ------------------------------------------------------------------

def _true_class_probability(model, inputs: torch.Tensor, labels: torch.Tensor, copies: int) -> torch.Tensor:
    """p_y of ``copies`` perturbed versions of every example, inputs stacked copy-major: (copies, N)."""
    chunk = max(1, 2048 // max(len(labels), 1))  # bounded memory: at most ~2048 images per forward
    out = []
    for start in range(0, copies, chunk):
        part = inputs[start * len(labels):(start + chunk) * len(labels)]
        repeats = len(part) // len(labels)
        out.append(model(part).softmax(1).gather(1, labels.repeat(repeats)[:, None]).view(repeats, len(labels)))
    return torch.cat(out)


def _regions(shape: tuple, patch: int) -> torch.Tensor:
    """Region index of every input value: square patches of images (all channels together), or
    consecutive groups of ``patch`` features for flat inputs."""
    if len(shape) == 3:
        _, h, w = shape
        rows = torch.arange(h) // patch
        cols = torch.arange(w) // patch
        grid = rows[:, None] * math.ceil(w / patch) + cols[None, :]
        return grid.expand(shape)
    return (torch.arange(math.prod(shape)) // patch).view(shape)


def occlusion_scores(model, inputs, labels, patch: int) -> torch.Tensor:
    """Drop of p_y when each region is set to zero; one score per input value, shape of ``inputs``."""
    regions = _regions(tuple(inputs.shape[1:]), patch).to(inputs.device)
    count = int(regions.max()) + 1
    keep = torch.stack([(regions != r) for r in range(count)]).to(inputs.dtype)  # (R, *shape)
    occluded = (keep[:, None] * inputs[None]).flatten(0, 1)
    base = model(inputs).softmax(1).gather(1, labels[:, None]).squeeze(1)
    drop = base[None] - _true_class_probability(model, occluded, labels, count)  # (R, N)
    return drop.t()[:, regions.flatten()].view_as(inputs)


def rise_scores(model, inputs, labels, masks: int, grid: int, generator) -> torch.Tensor:
    """RISE (Petsiuk et al. 2018): p_y under random smooth masks, averaged per input value."""
    shape = tuple(inputs.shape[1:])
    if len(shape) != 3:
        raise PluginError("jsigr: mask_kind=rise needs image inputs (C x H x W); use mask_kind=occlusion")
    _, h, w = shape
    cell_h, cell_w = math.ceil(h / grid), math.ceil(w / grid)
    cells = (torch.rand((masks, 1, grid + 1, grid + 1), generator=generator) < 0.5).float()
    up = F.interpolate(cells, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell_h, (masks,), generator=generator)
    dx = torch.randint(0, cell_w, (masks,), generator=generator)
    soft = torch.stack([up[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(masks)]).to(inputs)  # (M,1,H,W)
    perturbed = (soft[:, None] * inputs[None]).flatten(0, 1)
    probability = _true_class_probability(model, perturbed, labels, masks)  # (M, N)
    weighted = torch.einsum("mn,mchw->nchw", probability, soft)
    return (weighted / soft.sum(0).clamp_min(1e-6)).expand_as(inputs).contiguous()


def saliency_mask(model, inputs, labels, settings, generator) -> torch.Tensor:
    """The detached binary mask M(x): 1 on the top ``mask_quantile`` of each example's saliency."""
    with torch.no_grad(), eval_mode(model):
        if settings["mask_kind"] == "occlusion":
            scores = occlusion_scores(model, inputs, labels, settings["occlusion_patch"])
        else:
            scores = rise_scores(model, inputs, labels, settings["rise_masks"], settings["rise_grid"], generator)
    flat = scores.flatten(1)
    keep = max(1, round(settings["mask_quantile"] * flat.shape[1]))
    # ties (values of one occluded patch share a score) are broken by position, so exactly `keep` are marked
    order = torch.argsort(flat, dim=1, descending=True, stable=True)[:, :keep]
    mask = torch.zeros_like(flat).scatter_(1, order, 1.0)
    return mask.view_as(inputs).detach()


class MaskCache:
    """Masks kept per example (recognised by a hash of its input) and recomputed every N epochs."""

    def __init__(self):
        self.masks: dict[bytes, tuple[int, torch.Tensor]] = {}

    @staticmethod
    def keys(inputs: torch.Tensor) -> list[bytes]:
        quantised = (inputs.detach().flatten(1).clamp(0, 1) * 65535).round().to(torch.int32).cpu().numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in quantised]

    def get(self, model, inputs, labels, settings, ctx) -> torch.Tensor:
        keys, epoch, every = self.keys(inputs), ctx.epoch, settings["mask_refresh_epochs"]
        stale = [i for i, k in enumerate(keys) if k not in self.masks or epoch - self.masks[k][0] >= every]
        if stale:
            index = torch.tensor(stale, device=inputs.device)
            fresh = saliency_mask(model, inputs[index], labels[index], settings, ctx.generator)
            for i, mask in zip(stale, fresh):
                self.masks[keys[i]] = (epoch, mask.to(torch.bool).cpu())
        return torch.stack([self.masks[k][1] for k in keys]).to(inputs)


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one cache per run, gone with the run


def masks_for(model, inputs, labels, settings, ctx) -> torch.Tensor:
    if settings["mask_refresh_epochs"] == 0:
        return saliency_mask(model, inputs, labels, settings, ctx.generator)
    if ctx not in _caches:
        _caches[ctx] = MaskCache()
    return _caches[ctx].get(model, inputs, labels, settings, ctx)


# -- the regularisers ------------------------------------------------------------------------------

def jacobian_penalty(logits: torch.Tensor, inputs: torch.Tensor, projections: int, generator) -> torch.Tensor:
    """Per-example estimate of ||J||_F^2 = K E_v ||d(v . z)/dx||^2 (v uniform on the unit sphere)."""
    n, k = logits.shape
    total = torch.zeros(n, device=logits.device, dtype=logits.dtype)
    for _ in range(projections):
        v = torch.randn((n, k), generator=generator).to(logits)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad, = torch.autograd.grad((logits * v).sum(), inputs, create_graph=True)
        total = total + k * grad.flatten(1).pow(2).sum(1)
    return total / projections


def log_likelihood_gradient(logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                            create_graph: bool) -> torch.Tensor:
    """grad_x log p_y(x), per example (the gradient explanation of the true class)."""
    log_p = F.log_softmax(logits, 1).gather(1, labels[:, None]).sum()
    grad, = torch.autograd.grad(log_p, inputs, create_graph=create_graph, retain_graph=True)
    return grad


@hookimpl
def training_step(model, batch, perturb, ctx):
    inputs, labels = batch
    settings = ctx.settings
    check_settings(settings)
    check_inputs(inputs)
    mask = masks_for(model, inputs, labels, settings, ctx)
    x = inputs.detach().clone().requires_grad_(True)
    logits = model(x)
    natural = F.cross_entropy(logits, labels)
    gradient = log_likelihood_gradient(logits, x, labels, create_graph=settings["saliency_weight"] > 0)
    selective = ((1 - mask) * gradient).flatten(1).pow(2).sum(1).mean()
    jacobian = jacobian_penalty(logits, x, settings["projections"], ctx.generator).mean() \
        if settings["jacobian_weight"] > 0 else torch.zeros((), device=inputs.device)
    loss = settings["jacobian_weight"] * jacobian + settings["saliency_weight"] * selective
    ctx.count_gradient_evaluations(len(labels) * extra_passes(settings))
    weight = settings["adversarial_weight"]
    logs = {}
    if weight > 0:
        adversarial_logits = model(perturb(model, inputs, labels))
        classification = (1 - weight) * natural + weight * F.cross_entropy(adversarial_logits, labels)
        logs["adversarial_accuracy"] = (adversarial_logits.argmax(1) == labels).float().mean().item()
    else:
        classification = natural
    energy = gradient.detach().pow(2)
    return {
        "loss": classification + loss,
        "natural_loss": natural.item(),
        "jacobian_penalty": jacobian.item(),
        "selective_penalty": selective.item(),
        "input_gradient_norm": energy.flatten(1).sum(1).sqrt().mean().item(),
        "saliency_gradient_energy": _inside_fraction(energy, mask).mean().item(),
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
        **logs,
    }


def extra_passes(settings: dict) -> int:
    """Per example, the passes of a training step that the core's counter does not see: the input
    gradient is a second backward pass through the forward pass (+1), backpropagated again when the
    saliency penalty is on (double backpropagation, +1); each Jacobian projection is both (+2)."""
    saliency = 2 if settings["saliency_weight"] > 0 else 1
    return saliency + (2 * settings["projections"] if settings["jacobian_weight"] > 0 else 0)


def _inside_fraction(energy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (energy * mask).flatten(1).sum(1) / energy.flatten(1).sum(1).clamp_min(1e-30)


# -- evaluation: gradient metrics and the saliency figure ------------------------------------------

def gradient_maps(model, inputs, labels, settings, generator) -> dict[str, torch.Tensor]:
    """Per example: input-gradient norm, exact Jacobian Frobenius norm, energy inside the mask."""
    with eval_mode(model), torch.enable_grad():
        x = inputs.detach().clone().requires_grad_(True)
        logits = model(x)
        gradient = log_likelihood_gradient(logits, x, labels, create_graph=False)
        squared = torch.zeros(len(labels), device=inputs.device)
        for k in range(logits.shape[1]):
            row, = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < logits.shape[1])
            squared += row.flatten(1).pow(2).sum(1)
    mask = saliency_mask(model, inputs, labels, settings, generator)
    energy = gradient.pow(2)
    return {"gradient": gradient.detach(), "mask": mask, "gradient_norm": energy.flatten(1).sum(1).sqrt(),
            "jacobian_norm": squared.sqrt(), "inside": _inside_fraction(energy, mask)}


def write_png(path, inputs, maps, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    figure, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.6), squeeze=False)
    rows = [("input", inputs), ("saliency mask", maps["mask"]), ("|grad log p_y|", maps["gradient"].abs())]
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            image = images[c].detach().cpu()
            if r > 0:  # maps: summed over channels
                axes[r, c].imshow(image.abs().sum(0).numpy(), cmap="hot")
            elif image.shape[0] == 3:
                axes[r, c].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                axes[r, c].imshow(image.mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(title, fontsize=8)
            if r == 0:
                axes[r, c].set_title(f"y={int(labels[c])}", fontsize=8)
    figure.suptitle("J-SIGR: perturbation saliency vs. input gradient", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@hookimpl
def evaluate(model, dataset, ctx):
    settings = ctx.settings
    check_settings(settings)
    count = min(len(dataset), settings["eval_examples"])
    if count == 0 or dataset.inputs.dtype in (torch.int32, torch.int64):
        return {}  # nothing asked, or token ids (a text run): no input gradient to measure
    batch_size = ctx.config["eval"]["batch_size"]
    # a fixed random subset: evaluation splits are often sorted by class
    subset = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SPLIT_SEED))[:count].sort().values
    parts = {"gradient_norm": [], "jacobian_norm": [], "inside": []}
    for start in range(0, count, batch_size):
        inputs, labels = dataset.batch(subset[start:start + batch_size], ctx.device)
        maps = gradient_maps(model, inputs, labels, settings, ctx.generator)
        for key, values in parts.items():
            values.append(maps[key].cpu())
    metrics = {
        "input_gradient_norm": torch.cat(parts["gradient_norm"]).mean().item(),
        "jacobian_frobenius_norm": torch.cat(parts["jacobian_norm"]).mean().item(),
        "saliency_gradient_energy": torch.cat(parts["inside"]).mean().item(),
    }
    shown = min(settings["png_examples"], len(dataset))
    if ctx.is_main and ctx.out_dir is not None and shown and len(dataset.input_shape) == 3:
        # one example of each class first, so the figure shows the whole label set
        first = [int((dataset.labels == c).nonzero()[0]) for c in range(ctx.num_classes) if (dataset.labels == c).any()]
        index = torch.tensor((first + list(range(len(dataset))))[:shown])
        inputs, labels = dataset.batch(index, ctx.device)
        write_png(ctx.out_dir / "jsigr_saliency.png", inputs, gradient_maps(model, inputs, labels, settings,
                                                                            ctx.generator), labels)
    return metrics
