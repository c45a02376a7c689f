"""``srouda``: SRoUDA, meta self-training for robust unsupervised domain adaptation (Zhu, Yin, Chen and
Liu, "SRoUDA: Meta Self-training for Robust Unsupervised Domain Adaptation", AAAI 2023,
arXiv:2212.05917; code: VisionFlow/SRoUDA_main).

Adversarial training needs labels and the target domain has none. SRoUDA runs two phases in one run:

1. UDA pre-training (``pretrain_epochs``): the main model learns the labelled source and is aligned
   to the unlabelled target by DANN (a domain discriminator behind a gradient-reversal layer) or MDD
   (an adversarial head behind a gradient-reversal layer, margin disparity discrepancy), with Random
   Masked Augmentation (RMA): the transfer loss is applied a second time between the source and
   patch-masked target images::

       L = CE(f(x_s), y_s) + gamma * T(x_s, x_t) + rho * T(x_s, RMA(x_t))

2. Meta self-training (the remaining epochs), Meta-Pseudo-Labels style. The teacher is the model
   after pre-training (copied into the added model ``teacher`` when the phase starts); the student
   (the main model, initialised from the same weights) is the model evaluated at the end. Per step:
   the teacher labels the weak target view (hard label y~, confidence mask >= ``threshold``); the
   student is adversarially trained on the strong target view only: x_adv = PGD(student, x_us, y~),
   minimise CE(s(x_adv), y~); then the teacher takes one step on::

       L_t = CE(t(x_s), y_s) + lambda_u * mean(mask * H(softmax(t(x_uw) / T), t(x_us)))
             + h * CE(t(x_us), argmax t(x_us)),
       h   = meta_sign * (CE(s_new(x_s), y_s) - CE(s_old(x_s), y_s))

   ``meta_sign: 1`` is the official code (the MPL authors' formula); ``-1`` is the sign argued for in
   MPL-pytorch issue #6; ``0`` drops the meta term (teacher trained by its UDA loss only).

The student never sees clean target images or any target label: it is only ever given adversarial
strong views labelled by the teacher. Target labels reach nothing but the core's
``ctx.score_pseudo_labels`` (the logged ``pseudo_label_accuracy``).

Variants for side-by-side comparison (``mode``): ``source_only`` (CE on the source only), ``uda``
(phase 1 for every epoch), ``naive_self_training`` (phase 2 with a frozen teacher: the student is
adversarially trained on fixed pseudo-labels, no teacher update, no meta term) and ``srouda``.

Strong view (``strong_view``): ``randaugment`` (default, as the official code: RandAugment(2, 10) from
the USPS pool plus a final cutout, re-implemented on tensors), ``rma`` (patch masking, as the paper's
text describes), or ``none``.

Settings (``plugins.srouda``)::

    mode: srouda               # source_only | uda | naive_self_training | srouda
    uda: mdd                   # mdd (official default) | dann: the UDA baseline of phase 1
    pretrain_epochs: 3         # epochs of phase 1 (modes naive_self_training and srouda)
    transfer_weight: 1.0       # gamma: weight of the transfer loss (official trade-off 1)
    rma_weight: 0.1            # rho: weight of the transfer loss on RMA-masked target images (official 0.1)
    rma_patch: 2               # RMA patch size in pixels (official digits: 2)
    rma_ratio: 0.5             # fraction of patches zeroed (official digits 0.85, Office 0.25; 0.5 here)
    mdd_margin: 4.0            # MDD margin gamma (dalib default)
    grl_high: null             # final gradient-reversal coefficient; null: 1.0 for dann, 0.1 for mdd (dalib)
    grl_max_iters: 1000        # warm-start length of the gradient-reversal coefficient (dalib)
    discriminator_hidden: 1024 # DANN discriminator width (dalib)
    teacher_lr: 0.0001         # teacher learning rate (official digits 1e-4); the student uses train.lr
    threshold: 0.95            # confidence mask of the teacher's UDA consistency term
    temperature: 1.0           # softmax temperature of the teacher's soft pseudo-labels
    lambda_u: 1.0              # weight of the consistency term
    uda_steps: 1               # linear warm-up of lambda_u over meta steps (official 1: none)
    meta_sign: 1               # 1 (official code) | -1 (MPL issue #6) | 0 (no meta term)
    strong_view: randaugment   # randaugment | rma | none
    randaugment_ops: 2         # RandAugment n
    randaugment_magnitude: 10  # RandAugment m (0..10)

The student's PGD uses the run's training attack settings (``attack``: eps, steps, alpha, norm;
default alpha 2.5 eps / steps) through the core primitive. The student's optimizer is the run's
(``train``), re-initialised when phase 2 starts; the teacher's is the same kind with ``teacher_lr``.
``run_defaults`` selects ``data.name: mnist-to-digits``. On data without an unlabelled target (plain
classification), the source images stand in for the target (no domain shift; a warning says so and
``target_is_source`` is logged as 1).

Logged per epoch (metrics.jsonl): ``pseudo_label_accuracy`` (phase 1: the model's argmax on the
target batch; phase 2: the teacher's hard pseudo-labels), ``phase`` (1 or 2), phase 1 losses
(``source_loss``, ``transfer_loss``, ``rma_loss``, ``domain_accuracy`` for DANN, ``grl_coefficient``),
phase 2 losses (``student_loss``, ``teacher_uda_loss``, ``teacher_meta_loss``, ``meta_h``,
``mask_fraction``). ``evaluate`` adds ``teacher_clean_accuracy`` (phase 2 modes).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import pgd, step_size
from advframe.models import eval_mode, reverse_gradient, unwrap

MODES = ("source_only", "uda", "naive_self_training", "srouda")
UDA = ("dann", "mdd")
STRONG_VIEWS = ("randaugment", "rma", "none")
TEACHER, DISCRIMINATOR, ADVERSARY = "teacher", "discriminator", "adversarial_head"


@hookimpl
def default_config():
    return {"mode": "srouda", "uda": "mdd", "pretrain_epochs": 3, "transfer_weight": 1.0, "rma_weight": 0.1,
            "rma_patch": 2, "rma_ratio": 0.5, "mdd_margin": 4.0, "grl_high": None, "grl_max_iters": 1000,
            "discriminator_hidden": 1024, "teacher_lr": 1.0e-4, "threshold": 0.95, "temperature": 1.0,
            "lambda_u": 1.0, "uda_steps": 1, "meta_sign": 1, "strong_view": "randaugment",
            "randaugment_ops": 2, "randaugment_magnitude": 10}


@hookimpl
def run_defaults():
    return {"data": {"name": "mnist-to-digits"}}


def checked(settings: dict, epochs: int) -> dict:
    """The settings, or a PluginError saying which value to change."""
    for key, allowed in (("mode", MODES), ("uda", UDA), ("strong_view", STRONG_VIEWS), ("meta_sign", (1, -1, 0))):
        if settings[key] not in allowed:
            raise PluginError(f"srouda: {key} must be one of {', '.join(map(str, allowed))}, got {settings[key]!r}")
    for key in ("transfer_weight", "rma_weight", "mdd_margin", "lambda_u"):
        if settings[key] < 0:
            raise PluginError(f"srouda: {key} must be >= 0, got {settings[key]}")
    for key in ("teacher_lr", "temperature", "grl_max_iters", "rma_patch", "discriminator_hidden", "uda_steps"):
        if settings[key] <= 0:
            raise PluginError(f"srouda: {key} must be > 0, got {settings[key]}")
    if not 0 <= settings["rma_ratio"] < 1:
        raise PluginError(f"srouda: rma_ratio must be in [0, 1), got {settings['rma_ratio']}")
    if not 0 <= settings["threshold"] <= 1:
        raise PluginError(f"srouda: threshold must be in [0, 1], got {settings['threshold']}")
    if settings["grl_high"] is not None and (isinstance(settings["grl_high"], bool)
                                             or not isinstance(settings["grl_high"], (int, float))
                                             or settings["grl_high"] < 0):
        raise PluginError(f"srouda: grl_high must be a number >= 0 or null, got {settings['grl_high']!r}")
    if not 0 <= settings["randaugment_magnitude"] <= 10 or settings["randaugment_ops"] < 0:
        raise PluginError("srouda: randaugment_magnitude must be in [0, 10] and randaugment_ops >= 0")
    if settings["mode"] in ("naive_self_training", "srouda") and not 0 <= settings["pretrain_epochs"] < epochs:
        raise PluginError(f"srouda: pretrain_epochs must be in [0, train.epochs) = [0, {epochs}) so that the "
                          f"self-training phase has epochs; got {settings['pretrain_epochs']}")
    return settings


def self_training(settings: dict) -> bool:
    return settings["mode"] in ("naive_self_training", "srouda")


# -- features, gradient reversal, the UDA heads ------------------------------------------------------

def grl_coefficient(step: int, high: float, max_iters: int) -> float:
    """dalib's warm start: 2 high / (1 + exp(-step / max_iters)) - high, from 0 towards ``high``."""
    return 2.0 * high / (1.0 + math.exp(-step / max_iters)) - high


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(features, classifier)`` of a model built as ``classifier(features(x))`` (small-cnn, mlp, conv4)."""
    model = unwrap(model)
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not isinstance(features, nn.Module) or not isinstance(classifier, nn.Module):
        raise PluginError("srouda: UDA needs a model with `features` and `classifier` modules (e.g. "
                          "model.name=small-cnn); or set plugins.srouda.mode=source_only")
    return features, classifier


def logits_and_features(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of the whole model (so the core counts it), with its flat features."""
    features, _ = split_model(model)
    captured = []
    handle = features.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        logits = model(inputs)
    finally:
        handle.remove()
    return logits, captured[-1].flatten(1)


class DomainDiscriminator(nn.Module):
    """dalib's DANN discriminator: two hidden layers with BatchNorm and ReLU, one domain logit (> 0: source)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                    nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                    nn.Linear(hidden, 1))

    def forward(self, features):
        return self.layers(features).squeeze(1)


def dann_loss(discriminator: nn.Module, source: torch.Tensor, target: torch.Tensor, scale: float):
    """Domain-adversarial loss: BCE of the discriminator on reversed features (source 1, target 0),
    averaged over the two domains as dalib does; and the discriminator's accuracy."""
    domain = discriminator(reverse_gradient(torch.cat([source, target]), scale))
    truth = torch.cat([torch.ones(len(source)), torch.zeros(len(target))]).to(domain)
    d_source, d_target = domain[:len(source)], domain[len(source):]
    loss = 0.5 * (F.binary_cross_entropy_with_logits(d_source, truth[:len(source)])
                  + F.binary_cross_entropy_with_logits(d_target, truth[len(source):]))
    accuracy = ((domain > 0).to(truth) == truth).float().mean().item()
    return loss, accuracy


def mdd_loss(head: nn.Module, logits_s, features_s, logits_t, features_t, scale: float, margin: float):
    """Margin disparity discrepancy, as the quantity the model minimises (thuml/MDD, dalib with its sign):
    the adversarial head, behind gradient reversal, agrees with the main head on the source and
    disagrees on the target; the features are pushed the other way.

        margin * CE(h'(f_s), argmax h(f_s)) - log(1 - softmax(h'(f_t))[argmax h(f_t)])
    """
    adv_s, adv_t = head(reverse_gradient(features_s, scale)), head(reverse_gradient(features_t, scale))
    source = F.cross_entropy(adv_s, logits_s.detach().argmax(1))
    p_target = adv_t.softmax(1).gather(1, logits_t.detach().argmax(1)[:, None]).squeeze(1)
    target = -torch.log((1 - p_target).clamp_min(1e-6)).mean()
    return margin * source + target


def adversarial_head(classifier: nn.Module) -> nn.Module:
    """A freshly initialised copy of the model's classifier (MDD's auxiliary head)."""
    head = copy.deepcopy(classifier)
    for module in head.modules():
        if hasattr(module, "reset_parameters") and module is not head:
            module.reset_parameters()
    return head


# -- augmentations -----------------------------------------------------------------------------------

def random_masking(images: torch.Tensor, patch: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """RMA: split each image into ``patch x patch`` patches and zero ``int(ratio * patches)`` of them,
    chosen at random per image (the official masking generator)."""
    b, _, h, w = images.shape
    if h % patch or w % patch:
        raise PluginError(f"srouda: rma_patch={patch} must divide the image size {h}x{w}")
    rows, cols = h // patch, w // patch
    masked = int(ratio * rows * cols)
    order = torch.rand(b, rows * cols, generator=generator).argsort(1)
    keep = torch.ones(b, rows * cols)
    keep.scatter_(1, order[:, :masked], 0.0)
    keep = keep.view(b, 1, rows, cols).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return images * keep.to(images)


def _signed(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return values * (torch.randint(0, 2, values.shape, generator=generator) * 2 - 1).to(values)


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp with grey (0.5) fill, as PIL's affine transforms with fillcolor 128."""
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def _cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A grey square of side ``size`` centred at a random point (clipped at the border)."""
    if size <= 0:
        return images
    b, _, h, w = images.shape
    cx = (torch.rand(b, generator=generator) * w).long() - size // 2
    cy = (torch.rand(b, generator=generator) * h).long() - size // 2
    xs, ys = torch.arange(w), torch.arange(h)
    inside_x = (xs[None] >= cx[:, None].clamp_min(0)) & (xs[None] < (cx[:, None].clamp_min(0) + size).clamp_max(w))
    inside_y = (ys[None] >= cy[:, None].clamp_min(0)) & (ys[None] < (cy[:, None].clamp_min(0) + size).clamp_max(h))
    box = (inside_y[:, :, None] & inside_x[:, None, :])[:, None].to(images.device)
    return torch.where(box, torch.full_like(images, 0.5), images)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
    c = images.shape[1]
    weight = kernel.to(images).expand(c, 1, 3, 3)
    inner = F.conv2d(images, weight, groups=c)
    out = images.clone()
    out[..., 1:-1, 1:-1] = inner  # PIL's SMOOTH filter leaves the border pixels alone
    return out


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel: each value becomes its empirical CDF."""
    flat = images.flatten(2)
    ordered = flat.sort(2).values
    cdf = torch.searchsorted(ordered.contiguous(), flat.contiguous(), right=True).to(images) / flat.shape[2]
    return cdf.view_as(images)


def randaugment(images: torch.Tensor, ops: int, magnitude: float, generator: torch.Generator) -> torch.Tensor:
    """The official strong view for digits (RandAugmentUSPS) on tensors in [0, 1]: ``ops`` operations
    drawn per image from the 15-operation pool, each applied with a probability drawn from U(0.2, 0.8),
    then a grey cutout of side ``size // 3 * magnitude / 10``. Geometric operations use bilinear
    sampling (PIL: bicubic); Color is the identity on grey images."""
    b, _, h, w = images.shape
    level = magnitude / 10
    translate = h // 8 * level  # the pool's 32 // 8 pixels at 32x32, scaled to the image size
    out = images.clone()
    for _ in range(ops):
        choice = torch.randint(0, 15, (b,), generator=generator)
        chance = torch.rand(b, generator=generator) <= torch.empty(b).uniform_(0.2, 0.8, generator=generator)
        angle = _signed(torch.full((b,), 30.0 * level), generator) * math.pi / 180
        shear = _signed(torch.full((b,), 0.3 * level), generator)
        shift = _signed(torch.full((b,), 2 * translate / w), generator)
        for op in range(15):
            rows = ((choice == op) & chance).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            x = out[rows.to(out.device)]
            theta = torch.zeros(len(rows), 2, 3)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            if op == 0:  # autocontrast
                low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
                x = torch.where(high > low, (x - low) / (high - low).clamp_min(1e-8), x)
            elif op == 1:  # equalize
                x = _equalize(x)
            elif op == 2:  # invert
                x = 1 - x
            elif op == 3:  # rotate
                a = angle[rows]
                theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
                x = _affine(x, theta)
            elif op == 4:  # posterize: keep 8 - round(4 * level) bits
                bits = 8 - round(4 * level)
                step = 2 ** (8 - bits)
                x = torch.floor(x * 255 / step) * step / 255
            elif op == 5:  # solarize: invert pixels at or above 1 - level
                threshold = (255 - int(256 * level)) / 255
                x = torch.where(x >= threshold, 1 - x, x)
            elif op == 6:  # color: no effect on grey images
                pass
            elif op == 7:  # contrast 0.1 + 1.8 level around the mean grey
                mean = x.mean((1, 2, 3), keepdim=True)
                x = mean + (0.1 + 1.8 * level) * (x - mean)
            elif op == 8:  # brightness
                x = x * (0.1 + 1.8 * level)
            elif op == 9:  # sharpness
                smooth = _smooth(x)
                x = smooth + (0.1 + 1.8 * level) * (x - smooth)
            elif op in (10, 11):  # shear x / y
                theta[:, 0 if op == 10 else 1, 1 if op == 10 else 0] = shear[rows]
                x = _affine(x, theta)
            elif op in (12, 13):  # translate x / y by a constant number of pixels
                theta[:, 0 if op == 12 else 1, 2] = shift[rows]
                x = _affine(x, theta)
            else:  # cutout of side h // 8
                x = _cutout(x, int(translate), generator)
            out[rows.to(out.device)] = x.clamp(0, 1)
    return _cutout(out, int(h // 3 * level), generator).clamp(0, 1)


def strong_view(images: torch.Tensor, settings: dict, generator: torch.Generator) -> torch.Tensor:
    if settings["strong_view"] == "randaugment":
        return randaugment(images, settings["randaugment_ops"], settings["randaugment_magnitude"], generator)
    if settings["strong_view"] == "rma":
        return random_masking(images, settings["rma_patch"], settings["rma_ratio"], generator)
    return images


# -- setup ---------------------------------------------------------------------------------------------

@hookimpl
def setup(model, ctx):
    settings = checked(ctx.settings, ctx.data_passes)
    if settings["mode"] == "source_only":
        return
    features, classifier = split_model(model)
    if settings["uda"] == "dann":
        with torch.no_grad(), eval_mode(model):
            width = features(torch.zeros(2, *ctx.input_shape, device=ctx.device)).flatten(1).shape[1]
        ctx.add_model(DISCRIMINATOR, DomainDiscriminator(width, settings["discriminator_hidden"]))
    else:
        ctx.add_model(ADVERSARY, adversarial_head(classifier))
    if self_training(settings):
        ctx.add_model(TEACHER, copy.deepcopy(unwrap(model)), lr=settings["teacher_lr"])
    return


# -- training --------------------------------------------------------------------------------------------

def target_of(batch, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unlabelled target images of a domain-adaptation batch; else the source images (no shift)."""
    target = getattr(batch, "target_inputs", None)
    if target is not None:
        return target, batch.target_index
    # Python's default filter shows this once per run, not once per step
    warnings.warn("srouda: the data have no unlabelled target domain; the source images stand in for it "
                  "(set data.name=mnist-to-digits for domain adaptation)", stacklevel=2)
    return batch[0], None


def pseudo_label_accuracy(ctx, index, labels) -> dict[str, float]:
    if index is None or ctx.score_pseudo_labels is None:
        return {"target_is_source": 1.0}
    return {"pseudo_label_accuracy": ctx.score_pseudo_labels(index, labels)}


def _count(ctx, key: str) -> int:
    value = ctx.state.get(key)
    return int(value.item()) if value is not None else 0


def _bump(ctx, key: str) -> int:
    count = _count(ctx, key) + 1
    ctx.state[key] = torch.tensor(count)
    return count


def source_only_step(model, inputs, labels, target, index, ctx):
    loss = F.cross_entropy(model(inputs), labels)
    with torch.no_grad(), eval_mode(model):
        predicted = model(target).argmax(1)
    return {"loss": loss, "phase": 1.0, **pseudo_label_accuracy(ctx, index, predicted)}


def uda_step(model, inputs, labels, target, index, ctx, settings):
    """Phase 1: source CE plus the DANN or MDD transfer loss on the target and on its RMA view."""
    masked = random_masking(target, settings["rma_patch"], settings["rma_ratio"], ctx.generator)
    logits, features = logits_and_features(model, torch.cat([inputs, target, masked]))
    n, m = len(inputs), len(target)
    logits_s, logits_t, logits_m = logits[:n], logits[n:n + m], logits[n + m:]
    features_s, features_t, features_m = features[:n], features[n:n + m], features[n + m:]
    source = F.cross_entropy(logits_s, labels)
    high = settings["grl_high"] if settings["grl_high"] is not None else (1.0 if settings["uda"] == "dann" else 0.1)
    scale = grl_coefficient(_count(ctx, "pretrain_steps"), high, settings["grl_max_iters"])
    logs = {}
    if settings["uda"] == "dann":
        discriminator = ctx.models[DISCRIMINATOR]
        transfer, accuracy = dann_loss(discriminator, features_s, features_t, scale)
        rma, _ = dann_loss(discriminator, features_s, features_m, scale)
        logs["domain_accuracy"] = accuracy
        extra = DISCRIMINATOR
    else:
        head, margin = ctx.models[ADVERSARY], settings["mdd_margin"]
        transfer = mdd_loss(head, logits_s, features_s, logits_t, features_t, scale, margin)
        rma = mdd_loss(head, logits_s, features_s, logits_m, features_m, scale, margin)
        extra = ADVERSARY
    loss = source + settings["transfer_weight"] * transfer + settings["rma_weight"] * rma
    ctx.step(loss, models=["model", extra])
    _bump(ctx, "pretrain_steps")
    return {"loss": loss.detach(), "phase": 1.0, "source_loss": source.item(), "transfer_loss": transfer.item(),
            "rma_loss": rma.item(), "grl_coefficient": scale, **logs,
            **pseudo_label_accuracy(ctx, index, logits_t.detach().argmax(1))}


def start_self_training(model, ctx) -> None:
    """Phase 2 begins: the teacher takes the pre-trained weights; the student (the main model, the same
    weights) gets a fresh optimizer state. Recorded in ``ctx.state`` so a resumed run does not redo it."""
    if _count(ctx, "self_training_started"):
        return
    unwrap(ctx.models[TEACHER]).load_state_dict(unwrap(model).state_dict())
    ctx.optimizers["model"].state.clear()
    ctx.optimizers[TEACHER].state.clear()
    ctx.state["self_training_started"] = torch.tensor(1)


def meta_step(model, inputs, labels, target, index, ctx, settings):
    """Phase 2: teacher pseudo-labels, student adversarial step on the strong target view, teacher step
    with its UDA loss and the meta signal from the student's source loss (no teacher step when naive)."""
    start_self_training(model, ctx)
    teacher, student = ctx.models[TEACHER], model
    step = _bump(ctx, "meta_steps")
    strong = strong_view(target, settings, ctx.generator)
    n, m = len(inputs), len(target)
    naive = settings["mode"] == "naive_self_training"
    if naive:  # a frozen teacher (eval mode, no gradient): fixed pseudo-labels
        with torch.no_grad(), eval_mode(teacher):
            teacher_logits = teacher(torch.cat([inputs, target, strong]))
    else:
        teacher_logits = teacher(torch.cat([inputs, target, strong]))
    t_source, t_weak, t_strong = teacher_logits[:n], teacher_logits[n:n + m], teacher_logits[n + m:]
    soft = (t_weak.detach() / settings["temperature"]).softmax(1)
    confidence, hard = soft.max(1)
    mask = (confidence >= settings["threshold"]).float()

    attack = ctx.attack_params
    adversarial = pgd(student, strong, hard, eps=attack["eps"], alpha=step_size(attack), steps=attack["steps"],
                      norm=attack["norm"], random_start="uniform", generator=ctx.generator, bounds=ctx.input_bounds)
    student_logits = student(torch.cat([inputs, adversarial]))
    source_old = F.cross_entropy(student_logits[:n].detach(), labels)
    student_loss = F.cross_entropy(student_logits[n:], hard)
    ctx.step(student_loss, models=["model"])
    logs = {"loss": student_loss.detach(), "phase": 2.0, "student_loss": student_loss.item(),
            "mask_fraction": mask.mean().item(), **pseudo_label_accuracy(ctx, index, hard)}
    if naive:
        return logs

    with torch.no_grad():
        source_new = F.cross_entropy(student(inputs), labels)
    consistency = (-(soft * t_strong.log_softmax(1)).sum(1) * mask).mean()
    weight = settings["lambda_u"] * min(1.0, step / settings["uda_steps"])
    uda = F.cross_entropy(t_source, labels) + weight * consistency
    h = settings["meta_sign"] * (source_new - source_old)
    meta = h * F.cross_entropy(t_strong, t_strong.detach().argmax(1))
    ctx.step(uda + meta, models=[TEACHER])
    return {**logs, "teacher_uda_loss": uda.item(), "teacher_meta_loss": meta.item(), "meta_h": h.item()}


@hookimpl
def training_step(model, batch, ctx):
    settings = checked(ctx.settings, ctx.data_passes)
    inputs, labels = batch
    target, index = target_of(batch, ctx)
    if settings["mode"] == "source_only":
        return source_only_step(model, inputs, labels, target, index, ctx)
    if settings["mode"] == "uda" or ctx.epoch < settings["pretrain_epochs"]:
        return uda_step(model, inputs, labels, target, index, ctx, settings)
    return meta_step(model, inputs, labels, target, index, ctx, settings)


@hookimpl
def evaluate(model, dataset, ctx):
    if not self_training(ctx.settings) or TEACHER not in ctx.models:
        return {}
    teacher = unwrap(ctx.models[TEACHER])
    correct = 0
    batch_size = ctx.config["eval"]["batch_size"]
    with torch.no_grad(), eval_mode(teacher):
        for start in range(0, len(dataset), batch_size):
            inputs, labels = dataset.batch(torch.arange(start, min(start + batch_size, len(dataset))), ctx.device)
            correct += (teacher(inputs).argmax(1) == labels).sum().item()
    return {"teacher_clean_accuracy": correct / max(len(dataset), 1)}
