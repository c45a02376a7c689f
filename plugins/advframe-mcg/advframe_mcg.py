"""``mcg``: the Meta Conditional Generator black-box attack (Yin, Zhang, Wu, Feng, Zhang, Fan and Yang,
"Generalizable Black-box Adversarial Attack with Meta Learning", IEEE TPAMI 2023, arXiv:2301.00364;
code: SCLBD/MCG-Blackbox).

MCG treats attacking each benign image as one task and learns, on a white-box surrogate, a
conditional generator G(x, z) whose perturbation for a new image is a good *starting point* for any
query-based attack:

1. pre-training: G imitates the surrogate's transfer perturbations ``eps * sign(PGD-10 delta)``
   (the paper fits a c-Glow by maximum likelihood; here a small conditional conv encoder-decoder is
   fitted by mean squared error, the documented stand-in the issue allows);
2. meta-training (Reptile, model-level transferability): per task (a batch of images) ``inner_steps``
   Adam steps on the surrogate margin ``max(h_y(x + d) - max_{k != y} h_k(x + d), -kappa)``, then
   ``phi <- phi0 + meta_lr * (phi_m - phi0)``;
3. per example at attack time (example-level transferability): the surrogate is adapted online to
   the target's query feedback (MSE between the surrogate's and the target's probability of the
   label, on a minibatch of clean images already queried plus a "lifelong" term on the history of
   past examples' first adversarial queries, weight 3), G is fine-tuned ``finetune_steps`` Adam
   steps on the surrogate margin from the latent initialisation and interpolated back
   ``phi <- phi0 + interpolation * (phi_k - phi0)``, and its perturbation is handed to the chosen
   query attack as ``params["init"]``: that attack's first query is G's perturbation (the paper's
   "first attack"), and it goes on from there within the remaining budget. G is reset to the
   meta-parameters after every example; the surrogate and the history are kept.

Latent initialisation: the official code uses ``z0 = encode(x, decode(x, mean latent))``, which for
an invertible flow conditioned on the same x is the mean latent itself; here ``z0 = 0`` (the prior
mean). ``latent_steps`` > 0 adds the optional Adam steps on z (lr 0.01) on the surrogate margin.

Queries (every one through :class:`advframe.cost.QueryCounter`, all counted, the budget included):
one on each clean input (it says whether the example counts, and its scores feed the surrogate
adaptation: the official code takes them uncounted), then the seeded attack's queries, whose first
one is G's perturbation. A first-query success therefore costs 2 queries. The median reported by
the evaluator is over successful examples' query counts (the official ``get_median`` takes the
median of the success booleans; not repeated here).

Settings (``plugins.mcg`` or per use in ``eval.attacks``), with defaults::

    surrogate: null          # run directory of the white-box surrogate (``advframe attack --surrogate``)
    attack: square           # the query-based attack plugin MCG seeds (square, simba, nes, bandits, ...);
                             # none: only G's perturbation is queried (the official test_fasr mode)
    budget: 1000             # queries per example, the clean query included
    targeted: false          # true: the labels passed are target classes
    kappa: 5.0               # margin cap of the meta-training and fine-tuning loss (official 5)
    latent_dim: 8            # size of z
    width: 16                # channels of the generator
    meta_examples: 1000      # images of the surrogate's training split used to (meta-)train G
    pretrain_epochs: 1       # epochs imitating eps * sign(PGD-10 on the surrogate)
    pretrain_lr: 0.001
    meta_tasks: 300          # Reptile tasks (official: 5 epochs over ImageNet)
    meta_batch: 16           # images per task (official 16)
    inner_steps: 5           # Adam steps per task (official 5)
    inner_lr: 0.0004         # (official 4e-4)
    meta_lr: 0.1             # Reptile outer step size eta
    meta_train: true         # false: the pre-trained G only (no Reptile), the "non-meta G" ablation
    meta_seed: 0             # seed of G's initialisation and (meta-)training data order
    finetune: true           # per-example fine-tuning of G (ablation switch)
    finetune_steps: 2        # Adam steps per example (the METHODS.md reading; one code version uses 3)
    finetune_lr: 0.001       # (official 1e-3)
    interpolation: 0.2       # phi0 + interpolation * (phi_k - phi0) (one code version uses 0.005)
    grad_clip: 5.0           # gradient value clip while fine-tuning G (official max_grad_clip 5)
    latent_steps: 0          # optional Adam steps on z before fine-tuning (official option: 10)
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
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import misclassified, pgd, project
from advframe.cost import QueryCounter
from advframe.losses import margin
from advframe.models import eval_mode

DEFAULTS = {
    "surrogate": None, "attack": "square", "budget": 1000, "targeted": False, "kappa": 5.0,
    "latent_dim": 8, "width": 16, "meta_examples": 1000, "pretrain_epochs": 1, "pretrain_lr": 0.001,
    "meta_tasks": 300, "meta_batch": 16, "inner_steps": 5, "inner_lr": 0.0004, "meta_lr": 0.1,
    "meta_train": True, "meta_seed": 0, "finetune": True, "finetune_steps": 2, "finetune_lr": 0.001,
    "interpolation": 0.2, "grad_clip": 5.0, "latent_steps": 0, "adapt_surrogate": True,
    "surrogate_lr": 0.0001, "surrogate_batch": 20, "history_weight": 3.0, "mse_scale": 0.05,
    "surrogate_clip": 0.1, "chunk": 10, "carry_over": False,
}
GENERATOR_KEYS = ("latent_dim", "width", "meta_examples", "pretrain_epochs", "pretrain_lr", "meta_tasks",
                  "meta_batch", "inner_steps", "inner_lr", "meta_lr", "meta_train", "meta_seed", "kappa",
                  "targeted")
PROBABILITY_ATTACKS = {"simba"}  # attacks that read probabilities from the counter they are given


@hookimpl
def default_config():
    return dict(DEFAULTS)


# -- the conditional generator -------------------------------------------------------------------

class ConditionalGenerator(nn.Module):
    """G(x, z): a small conv encoder-decoder conditioned on the image, latent z broadcast over the
    half-resolution feature map, output ``eps * tanh`` (inside the L-inf ball by construction)."""

    def __init__(self, channels: int, latent_dim: int = 8, width: int = 16):
        super().__init__()
        self.latent_dim = latent_dim
        self.encode1 = nn.Conv2d(channels, width, 3, padding=1)
        self.encode2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.middle = nn.Conv2d(2 * width + latent_dim, 2 * width, 3, padding=1)
        self.decode1 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.decode2 = nn.Conv2d(2 * width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
        skip = F.relu(self.encode1(x * 2 - 1))
        h = F.relu(self.encode2(skip))
        h = torch.cat([h, z[:, :, None, None].expand(-1, -1, *h.shape[2:])], 1)
        h = F.relu(self.middle(h))
        h = F.interpolate(h, size=x.shape[2:], mode="nearest")
        h = F.relu(self.decode1(h))
        return eps * torch.tanh(self.decode2(torch.cat([h, skip], 1)))


def perturbation(generator: nn.Module, inputs: torch.Tensor, latent: torch.Tensor, eps: float) -> torch.Tensor:
    """G's perturbation for ``inputs``, also kept inside [0, 1] (x + d is never clamped in a forward
    pass; the box is applied to d, as the core's projection does)."""
    return project(generator(inputs, latent, eps), inputs, eps, "linf")


def surrogate_margin(surrogate: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, kappa: float,
                     targeted: bool) -> torch.Tensor:
    """The loss G minimises, per example: ``max(h_y - max_{k != y} h_k, -kappa)`` (untargeted), or
    ``max(max_{k != t} h_k - h_t, -kappa)`` (targeted), as the official ``adv_loss``."""
    distance = margin(surrogate(inputs), labels)  # best other minus label: positive = misclassified
    return (distance if targeted else -distance).clamp_min(-kappa)


def interpolate_(model: nn.Module, start: dict[str, torch.Tensor], fraction: float) -> None:
    """``phi <- phi0 + fraction * (phi - phi0)`` on every parameter except normalisation layers (the
    official Reptile step skips actnorm; this generator has none, the rule is kept for a G with any)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower():
                continue
            parameter.copy_(start[name] + fraction * (parameter - start[name]))


def adapt_generator(generator: nn.Module, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    latent: torch.Tensor, *, steps: int, lr: float, eps: float, kappa: float, targeted: bool,
                    clip: float | None = None) -> None:
    """``steps`` Adam steps of G on the mean surrogate margin of its perturbations for ``x``."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.9, 0.9999))
    for _ in range(steps):
        loss = surrogate_margin(surrogate, x + perturbation(generator, x, latent, eps), y, kappa, targeted).mean()
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_value_(generator.parameters(), clip)
        optimizer.step()


# -- training G on the surrogate (lazily, cached) -------------------------------------------------

_GENERATORS: dict[tuple, nn.Module] = {}
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
                    eps: float) -> ConditionalGenerator:
    """Pre-train G to imitate surrogate PGD-10 sign perturbations, then Reptile meta-train it on the
    surrogate margin. Deterministic given ``meta_seed`` (its own generator and a forked global RNG)."""
    seed = settings["meta_seed"]
    generator = torch.Generator().manual_seed(seed)
    device = inputs.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConditionalGenerator(inputs.shape[1], settings["latent_dim"], settings["width"]).to(device)
    count = min(settings["meta_examples"], len(inputs))
    chosen = torch.randperm(len(inputs), generator=generator)[:count].to(device)
    x, y = inputs[chosen], labels[chosen]
    targeted = settings["targeted"]
    if targeted:  # meta-train towards random other classes
        shift = torch.randint(1, int(labels.max()) + 1, (count,), generator=generator).to(device)
        y = (y + shift) % (int(labels.max()) + 1)
    with eval_mode(surrogate):
        imitation = eps * torch.sign(pgd(surrogate, x, y, eps=eps, alpha=2.5 * eps / 10, steps=10, norm="linf",
                                         targeted=targeted, generator=generator) - x)
        batch = settings["meta_batch"]
        optimizer = torch.optim.Adam(model.parameters(), lr=settings["pretrain_lr"])
        for _ in range(settings["pretrain_epochs"]):
            for index in torch.randperm(count, generator=generator).split(max(batch, 32)):
                index = index.to(device)
                latent = torch.randn(len(index), settings["latent_dim"], generator=generator).to(device)
                loss = F.mse_loss(model(x[index], latent, eps), imitation[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if settings["meta_train"]:
            for _ in range(settings["meta_tasks"]):
                index = torch.randperm(count, generator=generator)[:batch].to(device)
                latent = torch.randn(len(index), settings["latent_dim"], generator=generator).to(device)
                start = {k: v.detach().clone() for k, v in model.named_parameters()}
                adapt_generator(model, surrogate, x[index], y[index], latent, steps=settings["inner_steps"],
                                lr=settings["inner_lr"], eps=eps, kappa=settings["kappa"], targeted=targeted)
                interpolate_(model, start, settings["meta_lr"])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def meta_generator(ctx, params: dict, device) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(meta-trained G, a fresh copy of the surrogate, the surrogate's training inputs), G cached."""
    surrogate, inputs, labels = load_surrogate(ctx, params["surrogate"], device)
    key = (str(Path(params["surrogate"]).resolve()), params["eps"], str(device),
           tuple((k, params[k]) for k in GENERATOR_KEYS))
    if key not in _GENERATORS:
        _GENERATORS[key] = train_generator(surrogate, inputs, labels, params, params["eps"])
    return _GENERATORS[key], surrogate, inputs


# -- the attack ------------------------------------------------------------------------------------

class RecordingCounter(QueryCounter):
    """The core's query counter, also keeping each example's first query after ``start`` (the
    seeded attack's first query: G's perturbation) with the target's probabilities there."""

    def __init__(self, model, num_examples, start: torch.Tensor, labels: torch.Tensor, targeted: bool, **kwargs):
        super().__init__(model, num_examples, **kwargs)
        self.counts = start.clone()
        self.labels, self.targeted = labels, targeted
        self.succeeded = torch.zeros(num_examples, dtype=torch.bool)
        self.start = start.clone()
        self.first_inputs: dict[int, torch.Tensor] = {}
        self.first_probabilities: dict[int, torch.Tensor] = {}

    def __call__(self, inputs, index=None):
        index = torch.arange(len(inputs)) if index is None else index.cpu()
        first = (self.counts[index] == self.start[index]).tolist()
        scores = super().__call__(inputs, index)
        probabilities = scores if self.scores == "probabilities" else scores.softmax(1)
        self.succeeded[index] |= misclassified(scores, self.labels[index.to(self.labels.device)], self.targeted).cpu()
        for row, (example, is_first) in enumerate(zip(index.tolist(), first)):
            if is_first:
                self.first_inputs[example] = inputs[row].detach()
                self.first_probabilities[example] = probabilities[row]
        return scores


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


def example_perturbation(meta: nn.Module, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(G's perturbation before fine-tuning, after): latent initialisation at the prior mean,
    optional latent steps, ``finetune_steps`` Adam steps on the surrogate margin, interpolation back
    towards the meta-parameters. ``meta`` is never changed (the per-example copy is dropped)."""
    eps, kappa, targeted = params["eps"], params["kappa"], params["targeted"]
    latent = torch.zeros(1, meta.latent_dim, device=x.device)
    with torch.no_grad():
        before = perturbation(meta, x, latent, eps)
    for parameter in surrogate.parameters():
        parameter.requires_grad_(False)
    try:
        with eval_mode(surrogate):
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
            if not params["finetune"]:
                with torch.no_grad():
                    return before, perturbation(meta, x, latent, eps)
            local = copy.deepcopy(meta)
            for parameter in local.parameters():
                parameter.requires_grad_(True)
            start = {k: v.detach().clone() for k, v in local.named_parameters()}
            adapt_generator(local, surrogate, x, y, latent, steps=params["finetune_steps"], lr=params["finetune_lr"],
                            eps=eps, kappa=kappa, targeted=targeted, clip=params["grad_clip"])
            interpolate_(local, start, params["interpolation"])
            with torch.no_grad():
                return before, perturbation(local, x, latent, eps)
    finally:
        for parameter in surrogate.parameters():
            parameter.requires_grad_(True)


class MCGResult(NamedTuple):
    adversarial: torch.Tensor
    queries: torch.Tensor  # per example, the clean query included
    success: torch.Tensor
    counted: torch.Tensor  # attacked: the clean input was not already a success
    init: torch.Tensor  # G's perturbation handed to the attack (after fine-tuning)
    meta_init: torch.Tensor  # the meta-generator's perturbation before fine-tuning
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
    for key in ("meta_batch", "inner_steps", "surrogate_batch", "chunk", "latent_dim", "width", "meta_examples"):
        if params[key] < 1:
            raise PluginError(f"mcg: {key} must be >= 1, got {params[key]}")
    for key in ("finetune_steps", "latent_steps", "meta_tasks", "pretrain_epochs"):
        if params[key] < 0:
            raise PluginError(f"mcg: {key} must be >= 0, got {params[key]}")
    if not 0 <= params["interpolation"] <= 1 or not 0 < params["meta_lr"] <= 1:
        raise PluginError("mcg: interpolation must be in [0, 1] and meta_lr in (0, 1]")
    if params["attack"] == "none":
        return
    if params["attack"] == "mcg":
        raise PluginError("mcg: attack must be a query-based attack plugin (square, simba, nes, bandits), not mcg")
    ctx.host.require(params["attack"], "attack")
    if "budget" not in ctx.host.default_config(params["attack"]):
        raise PluginError(f"mcg: attack {params['attack']!r} is not a query-based attack (no budget setting); "
                          f"use square, simba, nes or bandits")


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
    n, targeted = len(inputs), params["targeted"]
    inputs, labels = inputs.detach(), labels.detach()
    scores = "probabilities" if params["attack"] in PROBABILITY_ATTACKS else "logits"
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
    child = None if params["attack"] == "none" else ctx.attack_settings(
        params["attack"], **{**params.get("attack_overrides", {}), "budget": params["budget"], "targeted": targeted,
                             "eps": params["eps"], "norm": params["norm"]})
    for start in range(0, n, params["chunk"]):
        rows = torch.arange(start, min(start + params["chunk"], n))
        for i in rows.tolist():
            if not counted[i]:
                continue
            if params["adapt_surrogate"]:
                adapt_surrogate(state, params, entries[i], generator)
            meta_init[i:i + 1], init[i:i + 1] = example_perturbation(
                meta, state.surrogate, inputs[i:i + 1], labels[i:i + 1], params)
        counter = RecordingCounter(model, len(rows), queries[rows], labels[rows], targeted, budget=params["budget"],
                                   scores=scores, attack=f"mcg+{params['attack']}")
        round_counted = counted[rows]
        if child is None:  # attack: none, G's perturbation only (the official test_fasr mode)
            todo = torch.nonzero(round_counted).squeeze(1)
            if len(todo):
                counter(inputs[rows][todo] + init[rows][todo], todo)
            adversarial[rows] = torch.where(round_counted.to(device).view(-1, 1, 1, 1), inputs[rows] + init[rows],
                                            inputs[rows])
        else:
            seeded = {**child, "init": init[rows], "counter": counter, "counted": round_counted.to(device)}
            adversarial[rows] = ctx.attack(model, inputs[rows], labels[rows], seeded)
        queries[rows] = counter.counts
        success[rows] = round_counted.cpu() & counter.succeeded
        for local, i in enumerate(rows.tolist()):
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
