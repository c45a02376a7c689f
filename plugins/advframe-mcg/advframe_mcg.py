"""``mcg``: the Meta Conditional Generator black-box attack (Yin, Zhang, Wu, Feng, Zhang, Fan and Yang,
"Generalizable Black-box Adversarial Attack with Meta Learning", IEEE TPAMI 2023, arXiv:2301.00364;
code: SCLBD/MCG-Blackbox).

MCG treats attacking each benign image as one task and learns, on a white-box surrogate, a
conditional generator G(x, z) whose perturbations for a new image are good *starting points* for
query-based attacks. G is a conditional normalising flow (the paper's c-Glow; here ``zuko``'s
RealNVP affine-coupling flow over the flattened perturbation, conditioned on a small conv feature
extractor of the clean image, followed by an element-wise affine layer whose shift and scale a
fully convolutional network computes from the image): an invertible map between a Gaussian
latent z (as many dimensions as the image) and a perturbation, so G gives a *distribution* of
perturbations for each image.

1. pre-training by maximum likelihood: G's flow fits ``p(delta / eps | x)`` to the surrogate's
   transfer perturbations, DI-MI-FGSM (momentum I-FGSM, ``transfer_steps`` steps of eps/steps, with
   input diversity: shrink and pad back with probability ``diversity``; ``diversity: 0`` is plain
   MI-FGSM; ``translation`` > 0 adds TI's Gaussian smoothing of the gradient), plus Gaussian
   dequantisation noise ``dequantize`` (the targets sit on the +-1 corners);
   a sampled perturbation is ``eps * clip(G(x, z), -1, 1)``, also kept in [0, 1] for ``x + delta``;
2. meta-training (Reptile, model-level transferability): per task (a batch of images, z sampled from
   the prior) ``inner_steps`` Adam steps on the surrogate margin
   ``max(h_y(x + d) - max_{k != y} h_k(x + d), -kappa)``, then ``phi <- phi0 + meta_lr * (phi_m - phi0)``;
3. per example at attack time: the surrogate is adapted online to the target's query feedback (MSE
   between the surrogate's and the target's probability of the label, on a minibatch of clean images
   already queried plus a "lifelong" term on the history of past examples' first adversarial queries,
   weight 3); ``samples`` latents are drawn from the prior (scale ``temperature``) and scored on the
   adapted surrogate (no target query), the best becomes z0; G is fine-tuned ``finetune_steps`` Adam
   steps on the surrogate margin at z0 and interpolated back ``phi <- phi0 + interpolation * (phi_k - phi0)``;
   its perturbation at z0 is handed to the chosen query attack as ``params["init"]`` (that attack's
   first query is G's perturbation, the paper's "first attack"), or, with ``attack: latent`` (the
   CG-Attack mode), queried first and then searched from by CMA-ES (``cma``) over z, every candidate
   one target query. G is reset to the meta-parameters after every example; the surrogate and the
   history are kept.

Queries (every one through :class:`advframe.cost.QueryCounter`, all counted, the budget included):
one on each clean input (it says whether the example counts, and its scores feed the surrogate
adaptation: the official code takes them uncounted), then the seeded attack's (or the latent
search's) queries, whose first one is G's perturbation. A first-query success therefore costs 2
queries. The latent samples are scored on the surrogate and cost no query. An example counts as a
success only when the point returned for it is one the target was queried at and misclassified (a
probe the attack rejected does not count).

Settings (``plugins.mcg`` or per use in ``eval.attacks``), with defaults::

    surrogate: null          # run directory of the white-box surrogate (``advframe attack --surrogate``)
    attack: square           # the query-based attack plugin MCG seeds (square, simba, nes, bandits, ...);
                             # latent: CMA-ES over G's latent z (the CG-Attack mode);
                             # none: only G's perturbation is queried (the official test_fasr mode)
    budget: 1000             # queries per example, the clean query included
    targeted: false          # true: the labels passed are target classes
    kappa: 5.0               # margin cap of the meta-training and fine-tuning loss (official 5)
    transforms: 3            # affine coupling layers of the flow
    hidden: 128              # hidden units of each coupling layer's two-layer network
    context: 32              # size of the image features the flow is conditioned on
    width: 16                # channels of the conv feature extractor
    meta_examples: 1000      # images of the surrogate's training split used to (meta-)train G
    transfer_steps: 10       # DI-MI-FGSM iterations on the surrogate (official family: 30 on ImageNet)
    momentum: 1.0            # MI-FGSM decay factor mu
    diversity: 0.5           # DI probability of the shrink-and-pad input transform (0: plain MI-FGSM)
    translation: 0           # TI: odd side of the Gaussian kernel smoothing the gradient (0: off)
    pretrain_epochs: 20      # maximum-likelihood epochs on the transfer perturbations
    pretrain_lr: 0.003
    dequantize: 0.1          # std of the Gaussian noise added to the +-1 targets while fitting
    meta_tasks: 300          # Reptile tasks (official: 5 epochs over ImageNet)
    meta_batch: 16           # images per task (official 16)
    inner_steps: 5           # Adam steps per task (official 5)
    inner_lr: 0.0004         # (official 4e-4)
    meta_lr: 0.1             # Reptile outer step size eta (1: keep the inner result, what the official code does)
    meta_train: true         # false: the likelihood-trained G only (no Reptile), the "non-meta G" ablation
    meta_seed: 0             # seed of G's initialisation and (meta-)training data order
    samples: 8               # latents drawn per example and scored on the surrogate (0: z0 = 0, the prior mode)
    temperature: 1.0         # scale of the prior the latents are drawn from
    finetune: true           # per-example fine-tuning of G (ablation switch)
    finetune_steps: 2        # Adam steps per example (the METHODS.md reading; one code version uses 3)
    finetune_lr: 0.001       # (official 1e-3)
    interpolation: 0.2       # phi0 + interpolation * (phi_k - phi0) (one code version uses 0.005)
    grad_clip: 5.0           # gradient value clip while fine-tuning G (official max_grad_clip 5)
    latent_steps: 0          # optional Adam steps on z0 before fine-tuning (official option: 10)
    cma_popsize: 20          # CMA-ES population of the latent search (official 20)
    cma_sigma: 1.0           # CMA-ES initial step size, in units of the prior's std
    adapt_surrogate: true    # online surrogate adaptation to the target's feedback (ablation switch)
    surrogate_lr: 0.0001     # Adam (official 1e-4 CIFAR, 3e-4 ImageNet)
    surrogate_batch: 20      # clean minibatch (the example plus 19 past clean queries) and history batch
    history_weight: 3.0      # lambda of the lifelong term (official, fixed)
    mse_scale: 0.05          # scale of the MSE losses (official forward_loss_lamda)
    surrogate_clip: 0.1      # gradient-norm clip of the surrogate step (official)
    chunk: 10                # examples adapted before one batched round of the seeded attack (1 = strictly
                             # sequential, as the official code; see README)
    carry_over: false        # keep the adapted surrogate, clean pool and history across calls (batches)

The seeded attack takes its settings from ``plugins.<attack>`` (e.g. ``plugins.square.p_init``) and,
when MCG is called from code, from ``params["attack_overrides"]`` (a dict). The official MCG runs its
Square with ``p_init`` 0.3 and the window schedule started 500 iterations in, so the first windows
are small and refine G's perturbation instead of overwriting it: on a 10,000-query scale that is
``p_init = 0.3 / 8 = 0.0375`` here.

Threat model: ``norm`` linf only, ``eps`` from the attack section. The meta-trained generator is
cached in memory per surrogate directory and generator settings, so only the first call trains it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import NamedTuple

import cma
import numpy as np
import torch
import torch.nn.functional as F
import zuko
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import misclassified, project
from advframe.cost import QueryCounter
from advframe.losses import margin
from advframe.models import eval_mode

DEFAULTS = {
    "surrogate": None, "attack": "square", "budget": 1000, "targeted": False, "kappa": 5.0,
    "transforms": 3, "hidden": 128, "context": 32, "width": 16, "meta_examples": 1000, "transfer_steps": 10,
    "momentum": 1.0, "diversity": 0.5, "translation": 0, "pretrain_epochs": 20, "pretrain_lr": 0.003,
    "dequantize": 0.1, "meta_tasks": 300, "meta_batch": 16, "inner_steps": 5, "inner_lr": 0.0004, "meta_lr": 0.1,
    "meta_train": True, "meta_seed": 0, "samples": 8, "temperature": 1.0, "finetune": True,
    "finetune_steps": 2, "finetune_lr": 0.001, "interpolation": 0.2, "grad_clip": 5.0, "latent_steps": 0,
    "cma_popsize": 20, "cma_sigma": 1.0, "adapt_surrogate": True, "surrogate_lr": 0.0001,
    "surrogate_batch": 20, "history_weight": 3.0, "mse_scale": 0.05, "surrogate_clip": 0.1, "chunk": 10,
    "carry_over": False,
}
GENERATOR_KEYS = ("transforms", "hidden", "context", "width", "meta_examples", "transfer_steps", "momentum",
                  "diversity", "translation", "pretrain_epochs", "pretrain_lr", "dequantize", "meta_tasks",
                  "meta_batch", "inner_steps", "inner_lr", "meta_lr", "meta_train", "meta_seed", "kappa", "targeted",
                  "temperature")
PROBABILITY_ATTACKS = {"simba"}  # attacks that read probabilities from the counter they are given
OWN_MODES = ("none", "latent")  # values of ``attack`` that are not another plugin


@hookimpl
def default_config():
    return dict(DEFAULTS)


# -- the conditional flow --------------------------------------------------------------------------

class ConditionalFlow(nn.Module):
    """G: a conditional normalising flow over the flattened perturbation in units of eps,
    ``p(delta / eps | x)``. Generative direction: ``u = T^-1(z; c(x))`` with ``T`` ``zuko``'s RealNVP
    (affine couplings with alternating masks, each coupling network fed a feature vector ``c(x)`` of
    the clean image), then a conditional element-wise affine layer ``delta / eps = m(x) + s(x) * u``
    whose shift and log-scale come from a fully convolutional network of the image (c-Glow's
    image-conditioned affine layers, at full resolution). ``decode`` maps a latent z (one per image,
    the image's size) to a perturbation; ``log_prob`` is the exact density by the change of variables."""

    def __init__(self, shape: tuple[int, ...], *, transforms: int = 3, hidden: int = 128, context: int = 32,
                 width: int = 16):
        super().__init__()
        self.shape = tuple(shape)
        self.features = math.prod(self.shape)
        channels = self.shape[0]
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * width, context))
        self.affine = nn.Sequential(
            nn.Conv2d(channels, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * channels, 3, padding=1))
        self.flow = zuko.flows.RealNVP(self.features, context, transforms=transforms,
                                       hidden_features=(hidden, hidden))

    def shift_scale(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The element-wise layer's shift and log-scale (kept in (-3, 3)), flattened like the perturbation."""
        shift, log_scale = self.affine(inputs * 2 - 1).chunk(2, 1)
        return shift.flatten(1), 3 * torch.tanh(log_scale.flatten(1) / 3)

    def distribution(self, inputs: torch.Tensor):
        """The RealNVP part's distribution of ``u`` given the images."""
        return self.flow(self.encoder(inputs * 2 - 1))

    def log_prob(self, units: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Log-density (nats per dimension) of perturbations ``units`` (in units of eps) given the images."""
        shift, log_scale = self.shift_scale(inputs)
        inner = (units.flatten(1) - shift) * torch.exp(-log_scale)
        return (self.distribution(inputs).log_prob(inner) - log_scale.sum(1)) / self.features

    def decode(self, inputs: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The perturbation (in units of eps, unclipped) that latent rows ``latent`` map to."""
        shift, log_scale = self.shift_scale(inputs)
        inner = self.distribution(inputs).transform.inv(latent)
        return (shift + torch.exp(log_scale) * inner).view(-1, *self.shape)

    def encode(self, inputs: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """The latent of perturbations ``units`` (the inverse of ``decode``)."""
        shift, log_scale = self.shift_scale(inputs)
        return self.distribution(inputs).transform((units.flatten(1) - shift) * torch.exp(-log_scale))


def perturbation(flow: ConditionalFlow, inputs: torch.Tensor, latent: torch.Tensor, eps: float) -> torch.Tensor:
    """``eps * clip(G(x, z), -1, 1)``, also kept inside [0, 1] for ``x + delta`` (the box is applied to
    delta, as the core's projection does)."""
    return project(eps * flow.decode(inputs, latent).clamp(-1, 1), inputs, eps, "linf")


def prior(count: int, flow: ConditionalFlow, temperature: float, generator, device) -> torch.Tensor:
    return temperature * torch.randn(count, flow.features, generator=generator).to(device)


def surrogate_margin(surrogate: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, kappa: float,
                     targeted: bool) -> torch.Tensor:
    """The loss G minimises, per example: ``max(h_y - max_{k != y} h_k, -kappa)`` (untargeted), or
    ``max(max_{k != t} h_k - h_t, -kappa)`` (targeted), as the official ``adv_loss``."""
    distance = margin(surrogate(inputs), labels)  # best other minus label: positive = misclassified
    return (distance if targeted else -distance).clamp_min(-kappa)


def interpolate_(model: nn.Module, start: dict[str, torch.Tensor], fraction: float) -> None:
    """``phi <- phi0 + fraction * (phi - phi0)``, written into the parameters themselves (the flow has
    no normalisation layer, so nothing is skipped)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(start[name] + fraction * (parameter - start[name]))


def adapt_generator(flow: ConditionalFlow, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    latent: torch.Tensor, *, steps: int, lr: float, eps: float, kappa: float, targeted: bool,
                    clip: float | None = None) -> None:
    """``steps`` Adam steps of G on the mean surrogate margin of its perturbations for ``x`` at ``latent``."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr, betas=(0.9, 0.9999))
    for _ in range(steps):
        loss = surrogate_margin(surrogate, x + perturbation(flow, x, latent, eps), y, kappa, targeted).mean()
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_value_(flow.parameters(), clip)
        optimizer.step()


# -- training G on the surrogate (lazily, cached) -------------------------------------------------

def diverse(inputs: torch.Tensor, probability: float, generator) -> torch.Tensor:
    """DI's input transform at the input size: with ``probability``, shrink the batch to a random
    size in [0.8, 1) of the side and pad it back at a random offset."""
    if torch.rand((), generator=generator) >= probability:
        return inputs
    side = inputs.shape[-1]
    small = int(torch.randint(max(1, int(0.8 * side)), side, (), generator=generator))
    left, top = (int(torch.randint(0, side - small + 1, (), generator=generator)) for _ in range(2))
    shrunk = F.interpolate(inputs, size=(small, small), mode="nearest")
    return F.pad(shrunk, (left, side - small - left, top, side - small - top))


def smooth(gradient: torch.Tensor, size: int) -> torch.Tensor:
    """TI: each channel of ``gradient`` convolved with a normalised Gaussian kernel of odd side
    ``size`` (std size / 4)."""
    offsets = torch.arange(size, dtype=gradient.dtype, device=gradient.device) - (size - 1) / 2
    weights = torch.exp(-offsets ** 2 / (2 * (size / 4) ** 2))
    kernel = torch.outer(weights, weights) / weights.sum() ** 2
    channels = gradient.shape[1]
    return F.conv2d(gradient, kernel.expand(channels, 1, size, size), padding=size // 2, groups=channels)


def transfer_perturbations(surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                           momentum: float, diversity: float, targeted: bool, generator,
                           translation: int = 0) -> torch.Tensor:
    """DI-MI-FGSM (TI-DI-MI-FGSM with ``translation`` > 0) on the surrogate: ``steps`` sign steps of
    eps/steps along the momentum of the L1-normalised cross-entropy gradients taken at diverse inputs;
    the perturbation (in the eps ball and [0, 1])."""
    delta, velocity = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(surrogate(diverse(x + delta, diversity, generator)), y)
        gradient, = torch.autograd.grad(loss, delta)
        if translation:
            gradient = smooth(gradient, translation)
        velocity = momentum * velocity + gradient / gradient.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        step = eps / steps * velocity.sign() * (-1 if targeted else 1)
        delta = project(delta.detach() + step, x, eps, "linf")
    return delta.detach()


def fit_likelihood(flow: ConditionalFlow, x: torch.Tensor, units: torch.Tensor, *, epochs: int, lr: float,
                   noise: float, generator, batch: int = 32) -> list[float]:
    """Maximum likelihood of ``units`` (perturbations / eps) given ``x``, with Gaussian dequantisation
    noise of std ``noise``; the mean log-likelihood (nats per dimension) of each epoch."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        total = 0.0
        for index in torch.randperm(len(x), generator=generator).split(batch):
            index = index.to(x.device)
            noisy = units[index] + noise * torch.randn(units[index].shape, generator=generator).to(x.device)
            loss = -flow.log_prob(noisy, x[index]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total -= float(loss.detach()) * len(index)
        history.append(total / len(x))
    return history


_GENERATORS: dict[tuple, ConditionalFlow] = {}
_SURROGATES: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}


def load_surrogate(ctx, path: str, device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The surrogate run's model (eval mode, frozen copy) and its training split (the meta data)."""
    from advframe import data
    from advframe.config import load_file, resolve
    from advframe.runner import load_trained_model

    key = str(Path(path).resolve())
    if key not in _SURROGATES:
        run_dir = Path(path)
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "model.safetensors").is_file():
            raise PluginError(f"mcg: surrogate {path} is not a finished run directory (config.yaml and "
                              f"model.safetensors); train one with advframe run and pass its folder")
        model = load_trained_model(ctx.host, run_dir, "cpu")
        config = resolve(ctx.host, load_file(run_dir / "config.yaml"), ["device=cpu"])
        train = data.load(config["data"]).train
        inputs, labels = train.batch(torch.arange(len(train)), torch.device("cpu"))
        if not inputs.dtype.is_floating_point:
            raise PluginError("mcg needs image inputs; the surrogate run's data are not images")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        _SURROGATES[key] = (model, inputs, labels)
    model, inputs, labels = _SURROGATES[key]
    return copy.deepcopy(model).to(device), inputs.to(device), labels.to(device)


def train_generator(surrogate: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, settings: dict,
                    eps: float) -> ConditionalFlow:
    """Fit G by maximum likelihood to the surrogate's DI-MI-FGSM perturbations, then Reptile
    meta-train it on the surrogate margin. Deterministic given ``meta_seed`` (its own generator and
    a forked global RNG). The per-epoch log-likelihoods are kept in ``G.log_likelihoods``."""
    seed = settings["meta_seed"]
    generator = torch.Generator().manual_seed(seed)
    device = inputs.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = ConditionalFlow(tuple(inputs.shape[1:]), transforms=settings["transforms"], hidden=settings["hidden"],
                               context=settings["context"], width=settings["width"]).to(device)
    count = min(settings["meta_examples"], len(inputs))
    chosen = torch.randperm(len(inputs), generator=generator)[:count].to(device)
    x, y = inputs[chosen], labels[chosen]
    targeted = settings["targeted"]
    if targeted:  # meta-train towards random other classes
        shift = torch.randint(1, int(labels.max()) + 1, (count,), generator=generator).to(device)
        y = (y + shift) % (int(labels.max()) + 1)
    with eval_mode(surrogate):
        units = transfer_perturbations(surrogate, x, y, eps=eps, steps=settings["transfer_steps"],
                                       momentum=settings["momentum"], diversity=settings["diversity"],
                                       targeted=targeted, generator=generator,
                                       translation=settings["translation"]) / eps
        flow.log_likelihoods = fit_likelihood(flow, x, units, epochs=settings["pretrain_epochs"],
                                              lr=settings["pretrain_lr"], noise=settings["dequantize"],
                                              generator=generator)
        if settings["meta_train"]:
            batch = settings["meta_batch"]
            for _ in range(settings["meta_tasks"]):
                index = torch.randperm(count, generator=generator)[:batch].to(device)
                latent = prior(len(index), flow, settings["temperature"], generator, device)
                start = {k: v.detach().clone() for k, v in flow.named_parameters()}
                adapt_generator(flow, surrogate, x[index], y[index], latent, steps=settings["inner_steps"],
                                lr=settings["inner_lr"], eps=eps, kappa=settings["kappa"], targeted=targeted)
                interpolate_(flow, start, settings["meta_lr"])
    for parameter in flow.parameters():
        parameter.requires_grad_(False)
    return flow.eval()


def meta_generator(ctx, params: dict, device) -> tuple[ConditionalFlow, nn.Module, torch.Tensor]:
    """(meta-trained G, a fresh copy of the surrogate, the surrogate's training inputs), G cached."""
    surrogate, inputs, labels = load_surrogate(ctx, params["surrogate"], device)
    key = (str(Path(params["surrogate"]).resolve()), params["eps"], str(device),
           tuple((k, params[k]) for k in GENERATOR_KEYS))
    if key not in _GENERATORS:
        _GENERATORS[key] = train_generator(surrogate, inputs, labels, params, params["eps"])
    return _GENERATORS[key], surrogate, inputs


# -- the attack ------------------------------------------------------------------------------------

class RecordingCounter(QueryCounter):
    """The core's query counter, also keeping each example's first query after ``start`` (G's
    perturbation) with the target's probabilities there, and every point at which an example's
    query reached the goal (so a success can be checked against the point the attack returns)."""

    def __init__(self, model, num_examples, start: torch.Tensor, labels: torch.Tensor, targeted: bool, **kwargs):
        super().__init__(model, num_examples, **kwargs)
        self.counts = start.clone()
        self.labels, self.targeted = labels, targeted
        self.start = start.clone()
        self.first_inputs: dict[int, torch.Tensor] = {}
        self.first_probabilities: dict[int, torch.Tensor] = {}
        self.wins: dict[int, list[torch.Tensor]] = {}

    def __call__(self, inputs, index=None):
        index = torch.arange(len(inputs)) if index is None else index.cpu()
        first = (self.counts[index] == self.start[index]).tolist()
        scores = super().__call__(inputs, index)
        probabilities = scores if self.scores == "probabilities" else scores.softmax(1)
        won = misclassified(scores, self.labels[index.to(self.labels.device)], self.targeted).tolist()
        for row, (example, is_first, is_win) in enumerate(zip(index.tolist(), first, won)):
            if is_first:
                self.first_inputs[example] = inputs[row].detach()
                self.first_probabilities[example] = probabilities[row]
            if is_win:
                self.wins.setdefault(example, []).append(inputs[row].detach())
        return scores

    def accepted(self, example: int, point: torch.Tensor) -> bool:
        """Whether ``point`` is one at which the target was queried and the example reached the goal."""
        return any(torch.allclose(point, win, rtol=0, atol=1e-6) for win in self.wins.get(example, ()))


class AttackState:
    """What MCG keeps across examples: the adapted surrogate and its optimizer, the pool of clean
    queries (images, the target's probabilities, labels) and the lifelong history of first
    adversarial queries."""

    def __init__(self, surrogate: nn.Module, lr: float, model: nn.Module):
        self.surrogate = surrogate
        for parameter in surrogate.parameters():
            parameter.requires_grad_(True)
        self.optimizer = torch.optim.Adam(surrogate.parameters(), lr=lr)
        self.model = model
        self.clean: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []


_STATES: dict[tuple, AttackState] = {}


def _stack(entries):
    return tuple(torch.stack(column) for column in zip(*entries))


def mse_to_target(surrogate, inputs, probabilities, labels) -> torch.Tensor:
    """MSE between the surrogate's and the target's probability of the label (the official
    forward loss, before its scale factor)."""
    surrogate_p = surrogate(inputs).softmax(1).gather(1, labels[:, None])
    return F.mse_loss(surrogate_p, probabilities.gather(1, labels[:, None]))


def surrogate_step(state: AttackState, params: dict, batches: list[tuple[tuple, float]]) -> None:
    """One Adam step on ``sum weight * mse_scale * MSE`` over the given (batch, weight) pairs."""
    state.optimizer.zero_grad()
    with eval_mode(state.surrogate):  # BatchNorm statistics stay those of the surrogate's training
        for (inputs, probabilities, labels), weight in batches:
            loss = weight * params["mse_scale"] * mse_to_target(state.surrogate, inputs, probabilities, labels)
            loss.backward()
    torch.nn.utils.clip_grad_norm_(state.surrogate.parameters(), params["surrogate_clip"])
    state.optimizer.step()


def sample(entries: list, count: int, generator) -> list:
    picks = torch.randperm(len(entries), generator=generator)[:count].tolist()
    return [entries[i] for i in picks]


def adapt_surrogate(state: AttackState, params: dict, current: tuple, generator) -> None:
    """Per example: MSE on the example plus ``surrogate_batch - 1`` past clean queries, then (once the
    history holds more than a batch) the lifelong step: history weighted ``history_weight``, the
    current example weighted 1."""
    others = [entry for entry in state.clean if entry is not current]
    batch = _stack(sample(others, params["surrogate_batch"] - 1, generator) + [current])
    surrogate_step(state, params, [(batch, 1.0)])
    if len(state.history) > params["surrogate_batch"]:
        history = _stack(sample(state.history, params["surrogate_batch"], generator))
        surrogate_step(state, params, [(history, params["history_weight"]), (_stack([current]), 1.0)])


class ExampleSeed(NamedTuple):
    """What MCG prepares for one example before querying it."""

    meta_init: torch.Tensor  # the meta-generator's perturbation at z0, before fine-tuning
    init: torch.Tensor  # G's perturbation at z0 after fine-tuning (the first adversarial query)
    latent: torch.Tensor  # z0
    generator: ConditionalFlow  # the fine-tuned copy of G (the meta-generator itself without fine-tuning)


def example_perturbation(meta: ConditionalFlow, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         params: dict, generator) -> ExampleSeed:
    """z0 = the best of ``samples`` prior draws on the surrogate margin (the prior mode without
    samples), optional latent steps, ``finetune_steps`` Adam steps of a copy of G on the surrogate
    margin at z0, interpolation back towards the meta-parameters. ``meta`` is never changed."""
    eps, kappa, targeted = params["eps"], params["kappa"], params["targeted"]
    for parameter in surrogate.parameters():
        parameter.requires_grad_(False)
    try:
        with eval_mode(surrogate):
            if params["samples"]:
                latents = prior(params["samples"], meta, params["temperature"], generator, x.device)
                many = x.expand(len(latents), *x.shape[1:])
                with torch.no_grad():
                    scores = surrogate_margin(surrogate, many + perturbation(meta, many, latents, eps),
                                              y.expand(len(latents)), kappa, targeted)
                latent = latents[int(scores.argmin())][None]
            else:
                latent = torch.zeros(1, meta.features, device=x.device)
            if params["latent_steps"]:
                latent = latent.clone().requires_grad_(True)
                optimizer = torch.optim.Adam([latent], lr=0.01, betas=(0.9, 0.5))
                for _ in range(params["latent_steps"]):
                    loss = surrogate_margin(surrogate, x + perturbation(meta, x, latent, eps), y, kappa,
                                            targeted).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                latent = latent.detach()
            with torch.no_grad():
                before = perturbation(meta, x, latent, eps)
            if not params["finetune"]:
                return ExampleSeed(before, before, latent, meta)
            local = copy.deepcopy(meta)
            for parameter in local.parameters():
                parameter.requires_grad_(True)
            start = {k: v.detach().clone() for k, v in local.named_parameters()}
            adapt_generator(local, surrogate, x, y, latent, steps=params["finetune_steps"], lr=params["finetune_lr"],
                            eps=eps, kappa=kappa, targeted=targeted, clip=params["grad_clip"])
            interpolate_(local, start, params["interpolation"])
            for parameter in local.parameters():
                parameter.requires_grad_(False)
            with torch.no_grad():
                return ExampleSeed(before, perturbation(local, x, latent, eps), latent, local.eval())
    finally:
        for parameter in surrogate.parameters():
            parameter.requires_grad_(True)


def target_margin(scores: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """What the latent search minimises: label minus best other score (untargeted), best other minus
    target (targeted); negative means the goal is reached."""
    distance = margin(scores, labels)
    return distance if targeted else -distance


def latent_search(counter: RecordingCounter, example: int, x: torch.Tensor, y: torch.Tensor, seed: ExampleSeed,
                  params: dict, cma_seed: int) -> torch.Tensor:
    """The CG-Attack mode for one example: query G's perturbation at z0, then CMA-ES over z from z0
    (diagonal covariance, as the official MetaLearner's options), each candidate one target query,
    in order, until the goal is reached or the budget is spent; the last queried point that reached
    the goal, else the best queried point."""
    eps, targeted, flow = params["eps"], params["targeted"], seed.generator
    index = torch.tensor([example])
    best_point = x + seed.init
    best = float(target_margin(counter(best_point, index), y, targeted)[0])
    if best < 0:
        return best_point
    options = {"popsize": params["cma_popsize"], "seed": cma_seed, "CMA_diagonal": True, "verbose": -9,
               "tolfun": 1e-10}
    search = cma.CMAEvolutionStrategy(seed.latent[0].cpu().double().numpy(), params["cma_sigma"], options)
    while int(counter.remaining(index)[0]) > 0:
        candidates = search.ask()
        latents = torch.as_tensor(np.stack(candidates), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            points = x + perturbation(flow, x.expand(len(latents), *x.shape[1:]), latents, eps)
        values = []
        for point in points:
            if int(counter.remaining(index)[0]) <= 0:
                return best_point
            value = float(target_margin(counter(point[None], index), y, targeted)[0])
            values.append(value)
            if value < best:
                best, best_point = value, point[None]
            if value < 0:
                return best_point
        search.tell(candidates, values)
    return best_point


class MCGResult(NamedTuple):
    adversarial: torch.Tensor
    queries: torch.Tensor  # per example, the clean query included
    success: torch.Tensor  # the returned point was queried and reached the goal
    counted: torch.Tensor  # attacked: the clean input was not already a success
    init: torch.Tensor  # G's perturbation handed to the attack (after fine-tuning)
    meta_init: torch.Tensor  # the meta-generator's perturbation at the same z0, before fine-tuning
    first_success: torch.Tensor  # succeeded at G's perturbation (the first query after the clean one)


def check_settings(params: dict, ctx) -> None:
    if not params.get("surrogate"):
        raise PluginError("mcg needs a white-box surrogate: pass --surrogate RUN_DIR to advframe attack "
                          "(or set plugins.mcg.surrogate to a finished run directory)")
    if not isinstance(params["surrogate"], (str, Path)):
        raise PluginError(f"mcg: surrogate must be a run directory path, got {params['surrogate']!r}")
    if params["norm"] != "linf":
        raise PluginError(f"mcg supports norm linf only (its generator is L-inf bounded), got {params['norm']!r}")
    budget = params["budget"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 2:
        raise PluginError(f"mcg: budget must be a whole number of queries >= 2 (clean + G's), got {budget!r}")
    for key in ("meta_batch", "inner_steps", "surrogate_batch", "chunk", "transforms", "hidden", "context", "width",
                "meta_examples", "transfer_steps", "cma_popsize"):
        if params[key] < 1:
            raise PluginError(f"mcg: {key} must be >= 1, got {params[key]}")
    for key in ("finetune_steps", "latent_steps", "meta_tasks", "pretrain_epochs", "samples"):
        if params[key] < 0:
            raise PluginError(f"mcg: {key} must be >= 0, got {params[key]}")
    if not 0 <= params["interpolation"] <= 1 or not 0 < params["meta_lr"] <= 1:
        raise PluginError("mcg: interpolation must be in [0, 1] and meta_lr in (0, 1]")
    if not 0 <= params["diversity"] <= 1:
        raise PluginError(f"mcg: diversity is a probability, got {params['diversity']}")
    if params["translation"] < 0 or (params["translation"] and params["translation"] % 2 == 0):
        raise PluginError(f"mcg: translation is an odd kernel side or 0 (off), got {params['translation']}")
    if params["temperature"] <= 0 or params["cma_sigma"] <= 0:
        raise PluginError("mcg: temperature and cma_sigma must be > 0")
    if params["attack"] in OWN_MODES:
        return
    if params["attack"] == "mcg":
        raise PluginError("mcg: attack must be a query-based attack plugin (square, simba, nes, bandits), "
                          "latent or none, not mcg")
    ctx.host.require(params["attack"], "attack")
    if "budget" not in ctx.host.default_config(params["attack"]):
        raise PluginError(f"mcg: attack {params['attack']!r} is not a query-based attack (no budget setting); "
                          f"use square, simba, nes, bandits, latent or none")


def mcg_attack(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, params: dict, ctx) -> MCGResult:
    """Run MCG on one batch (see the module docstring); the seeded attack reports the queries."""
    check_settings(params, ctx)
    if inputs.dim() != 4:
        raise PluginError(f"mcg needs image batches (N, C, H, W), got shape {tuple(inputs.shape)}")
    device, generator = inputs.device, ctx.generator
    meta, surrogate, meta_inputs = meta_generator(ctx, params, device)
    if meta_inputs.shape[1:] != inputs.shape[1:]:
        raise PluginError(f"mcg: the surrogate was trained on inputs {tuple(meta_inputs.shape[1:])} but the target's "
                          f"are {tuple(inputs.shape[1:])}; train the surrogate on the same data")
    key = (str(Path(params["surrogate"]).resolve()), id(model),
           repr(sorted((k, v) for k, v in params.items() if k in DEFAULTS)), params["eps"])
    state = _STATES.get(key) if params["carry_over"] else None
    if state is None or state.model is not model:
        state = AttackState(surrogate, params["surrogate_lr"], model)
        if params["carry_over"]:
            _STATES[key] = state
    n, targeted, mode = len(inputs), params["targeted"], params["attack"]
    inputs, labels = inputs.detach(), labels.detach()
    scores = "probabilities" if mode in PROBABILITY_ATTACKS else "logits"
    clean_counter = QueryCounter(model, n, budget=params["budget"], scores=scores, attack="mcg")
    clean_scores = clean_counter(inputs)
    counted = ~misclassified(clean_scores, labels, targeted)
    clean_probabilities = clean_scores if scores == "probabilities" else clean_scores.softmax(1)
    entries = {}
    for i in torch.nonzero(counted).squeeze(1).tolist():
        entries[i] = (inputs[i], clean_probabilities[i], labels[i])
        state.clean.append(entries[i])
    if params["adapt_surrogate"] and entries:  # the official clean pre-pass over the queried images
        new = list(entries.values())
        for start in range(0, len(new), params["surrogate_batch"]):
            surrogate_step(state, params, [(_stack(new[start:start + params["surrogate_batch"]]), 1.0)])

    adversarial = inputs.clone()
    queries = clean_counter.counts.clone()
    success = torch.zeros(n, dtype=torch.bool)
    first_success = torch.zeros(n, dtype=torch.bool)
    init = torch.zeros_like(inputs)
    meta_init = torch.zeros_like(inputs)
    child = None if mode in OWN_MODES else ctx.attack_settings(
        mode, **{**params.get("attack_overrides", {}), "budget": params["budget"], "targeted": targeted,
                 "eps": params["eps"], "norm": params["norm"]})
    for start in range(0, n, params["chunk"]):
        rows = torch.arange(start, min(start + params["chunk"], n))
        seeds = {}
        for i in rows.tolist():
            if not counted[i]:
                continue
            if params["adapt_surrogate"]:
                adapt_surrogate(state, params, entries[i], generator)
            seeds[i] = example_perturbation(meta, state.surrogate, inputs[i:i + 1], labels[i:i + 1], params, generator)
            meta_init[i:i + 1], init[i:i + 1] = seeds[i].meta_init, seeds[i].init
        counter = RecordingCounter(model, len(rows), queries[rows], labels[rows], targeted, budget=params["budget"],
                                   scores=scores, attack=f"mcg+{mode}")
        round_counted = counted[rows]
        adversarial[rows] = torch.where(round_counted.to(device).view(-1, 1, 1, 1), inputs[rows] + init[rows],
                                        inputs[rows])
        if mode == "none":  # G's perturbation only (the official test_fasr mode)
            todo = torch.nonzero(round_counted).squeeze(1)
            if len(todo):
                counter(inputs[rows][todo] + init[rows][todo], todo)
        elif mode == "latent":  # CMA-ES over z (the CG-Attack mode), one example after another
            for local, i in enumerate(rows.tolist()):
                if i in seeds:
                    cma_seed = int(torch.randint(1, 2**30, (), generator=generator))
                    adversarial[i:i + 1] = latent_search(counter, local, inputs[i:i + 1], labels[i:i + 1], seeds[i],
                                                         params, cma_seed)
        else:
            seeded = {**child, "init": init[rows], "counter": counter, "counted": round_counted.to(device)}
            adversarial[rows] = ctx.attack(model, inputs[rows], labels[rows], seeded)
        queries[rows] = counter.counts
        for local, i in enumerate(rows.tolist()):
            success[i] = bool(counted[i]) and counter.accepted(local, adversarial[i])
            if local in counter.first_inputs:
                probabilities = counter.first_probabilities[local]
                state.history.append((counter.first_inputs[local], probabilities, labels[i]))
                first_success[i] = bool(misclassified(probabilities[None], labels[i:i + 1], targeted)[0])
    if child is None:  # a seeded attack reports its own queries; here MCG is the whole attack
        ctx.record_queries(queries, success, counted=counted)
    return MCGResult(adversarial, queries, success, counted.cpu(), init, meta_init, first_success)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    return mcg_attack(model, inputs, labels, params, ctx).adversarial
