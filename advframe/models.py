"""Model architectures every plugin shares, and auxiliary BatchNorm for any model.

``build(config["model"], input_shape, num_classes)`` makes the model named by ``model.name``: one of
:data:`MODELS` or any ``package.module:callable`` (it receives ``num_classes``, ``in_channels`` and
``input_size`` if its signature takes them, plus ``model.args``). Models take inputs in [0, 1];
a model that wants normalised inputs normalises inside ``forward`` so attacks see raw pixels.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from advframe.errors import ConfigError


class SmallCNN(nn.Module):
    """Two conv blocks (with BatchNorm by default) and two linear layers: the default for 28x28 and
    other small inputs. Width 16 with BatchNorm trains faster and more robustly on the embedded MNIST
    subset than width 32 without (measured with PGD-AT, see README)."""

    def __init__(self, num_classes=10, in_channels=1, input_size=28, width=16, hidden=128, batch_norm=True):
        super().__init__()

        def block(cin, cout):
            layers = [nn.Conv2d(cin, cout, 3, padding=1)]
            layers += [nn.BatchNorm2d(cout)] if batch_norm else []
            return [*layers, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, width), *block(width, 2 * width), nn.Flatten())
        side = input_size // 4
        self.classifier = nn.Sequential(nn.Linear(2 * width * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected network for tabular data or flattened images."""

    def __init__(self, num_classes=10, in_features=784, hidden=(256, 256), dropout=0.0):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = size
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


class PreActResNet18(nn.Module):
    """He et al. 2016 (identity mappings), the fast-AT papers' CIFAR model."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 convolution, no max pooling)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, self.dropout, self.training) if self.dropout else out
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """Zagoruyko & Komodakis 2016: WRN-depth-width (TRADES uses 34-10, MART 28-10)."""

    def __init__(self, num_classes=10, in_channels=3, depth=28, width=10, dropout=0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"model.args.depth must be 6n+4 for wide-resnet, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, stride if i == 0 else 1, dropout))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Conv4(nn.Module):
    """The few-shot backbone of MAML and prototypical networks: four blocks of 3x3 convolution,
    BatchNorm, ReLU and 2x2 max pooling (64 filters), then a linear classifier on the flat features."""

    def __init__(self, num_classes=5, in_channels=1, input_size=28, width=64):
        super().__init__()
        blocks, cin = [], in_channels
        for _ in range(4):
            blocks += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*blocks, nn.Flatten())
        with torch.no_grad():
            dimension = self.features(torch.zeros(1, in_channels, input_size, input_size)).shape[1]
        self.classifier = nn.Linear(dimension, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class ResidualBlock12(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        layers = []
        for index in range(3):
            layers += [nn.Conv2d(cin if index == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            if index < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        return self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1))


class ResNet12(nn.Module):
    """ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019; the RFS backbone): four residual blocks of
    three 3x3 convolutions, widths 64-160-320-640, then global average pooling. DropBlock is omitted."""

    def __init__(self, num_classes=5, in_channels=3, widths=(64, 160, 320, 640)):
        super().__init__()
        blocks, cin = [], in_channels
        for width in widths:
            blocks.append(ResidualBlock12(cin, width))
            cin = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class TextClassifier(nn.Module):
    """Embedding, a 1-D convolution over positions, max pooling and a linear layer. ``forward`` takes
    token ids or embeddings (``embed(tokens)``), so attacks can perturb the embeddings."""

    def __init__(self, num_classes=2, vocab_size=20000, embedding_dim=64, channels=64, kernel=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.convolution = nn.Conv1d(embedding_dim, channels, kernel, padding=kernel // 2)
        self.classifier = nn.Linear(channels, num_classes)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def forward(self, x):
        embedded = self.embed(x) if not x.dtype.is_floating_point else x
        hidden = F.relu(self.convolution(embedded.transpose(1, 2)))
        return self.classifier(hidden.amax(2))


class SegmentationEncoder(nn.Module):
    """A small fully convolutional encoder for few-shot segmentation: three 3x3 convolutions (32
    channels, the last two with stride 2). Returns feature maps (``B x width x H/4 x W/4``); the
    prototype head (advframe.segmentation) turns them into per-pixel logits."""

    def __init__(self, in_channels=1, width=32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1))

    def forward(self, x):
        return self.features(x)


def _small_cnn(num_classes, in_channels, input_size, **args):
    return SmallCNN(num_classes, in_channels, input_size, **args)


def _mlp(num_classes, in_channels, input_size, **args):
    args.setdefault("in_features", in_channels * input_size * input_size if input_size else in_channels)
    return MLP(num_classes, **args)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": _small_cnn,
    "mlp": _mlp,
    "preact-resnet18": lambda num_classes, in_channels, input_size, **a: PreActResNet18(num_classes, in_channels, **a),
    "resnet18": lambda num_classes, in_channels, input_size, **a: ResNet18(num_classes, in_channels, **a),
    "wide-resnet": lambda num_classes, in_channels, input_size, **a: WideResNet(num_classes, in_channels, **a),
    "conv4": lambda num_classes, in_channels, input_size, **a: Conv4(num_classes, in_channels, input_size, **a),
    "resnet12": lambda num_classes, in_channels, input_size, **a: ResNet12(num_classes, in_channels, **a),
    "text-classifier": lambda num_classes, in_channels, input_size, vocab_size=20000, **a: TextClassifier(
        num_classes, vocab_size, **a),
    "seg-encoder": lambda num_classes, in_channels, input_size, **a: SegmentationEncoder(in_channels, **a),
}


CONVOLUTIONAL = {"small-cnn", "preact-resnet18", "resnet18", "wide-resnet", "conv4", "resnet12", "seg-encoder"}


def register_model(name: str):
    """Decorator adding a factory ``f(num_classes, in_channels, input_size, **args)`` to :data:`MODELS`."""

    def decorate(factory):
        MODELS[name] = factory
        return factory

    return decorate


def build(model_config: dict, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None = None) -> nn.Module:
    name, args = model_config["name"], dict(model_config.get("args") or {})
    if vocab_size is not None and name in CONVOLUTIONAL | {"mlp"}:
        raise ConfigError(f"the data are token sequences; model {name!r} cannot read them: use model.name=text-classifier")
    if len(input_shape) == 1 and name in CONVOLUTIONAL:
        raise ConfigError(f"model {name!r} needs image inputs, but the data are feature vectors of size "
                          f"{input_shape[0]}; use model.name=mlp")
    in_channels = input_shape[0]
    input_size = input_shape[-1] if len(input_shape) >= 2 else 0
    if name in MODELS:
        factory = MODELS[name]
        context = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
        if vocab_size is not None and name == "text-classifier":
            context["vocab_size"] = vocab_size
    elif ":" in name:
        factory = _import_callable(name)
        accepted = inspect.signature(factory).parameters
        context = {k: v for k, v in {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size,
                                     "vocab_size": vocab_size}.items() if k in accepted and v is not None}
    else:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model.name {name!r}{hint} Known: {', '.join(MODELS)}, or package.module:callable")
    try:
        return factory(**context, **args)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} does not accept model.args {args}: {exc}") from None


def _import_callable(spec: str):
    module_name, _, attribute = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import model {spec!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(f"model {spec!r} is not callable")
    return target


# -- auxiliary BatchNorm (AdvProp and any method that routes inputs to separate statistics) -----

class DualBatchNorm(nn.Module):
    """A BatchNorm layer with a twin: ``main`` for clean inputs, ``aux`` for another distribution.

    Which one runs is chosen for the whole model with :func:`batchnorm_route`.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.main = bn
        self.aux = type(bn)(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.aux.load_state_dict(bn.state_dict())
        self.route = "main"

    def forward(self, x):
        return self.aux(x) if self.route == "aux" else self.main(x)


def with_auxiliary_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` (in place) by a :class:`DualBatchNorm`."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, child_name, DualBatchNorm(child))
                replaced += 1
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ConfigError("the model is a bare BatchNorm layer")
    if replaced == 0:
        raise ConfigError("this model has no BatchNorm layers to give auxiliary twins; "
                          "choose a model with BatchNorm (e.g. model.args.batch_norm=true for small-cnn)")
    return model


@contextlib.contextmanager
def batchnorm_route(model: nn.Module, route: str):
    """Run ``model``'s :class:`DualBatchNorm` layers on ``route`` (``"main"`` or ``"aux"``) inside the block."""
    layers = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    previous = [m.route for m in layers]
    for layer in layers:
        layer.route = route
    try:
        yield model
    finally:
        for layer, route_before in zip(layers, previous):
            layer.route = route_before


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the block; the previous mode of every submodule is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def embed(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's embedding: ``model.features`` when it has one, else the penultimate features."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        return features(inputs).flatten(1)
    return penultimate_features(model, inputs)


def penultimate_features(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Inputs to the last linear layer (the embedding most feature analyses use)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ConfigError("penultimate features need a model whose last layer is nn.Linear")
    captured = []
    handle = last[-1].register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        model(inputs)
    finally:
        handle.remove()
    return captured[-1].flatten(1)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, scale):
        ctx.scale = scale
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(inputs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Gradient reversal (Ganin & Lempitsky 2015): identity forward, gradient times ``-scale``
    backward, so a feature extractor learns to fool the domain discriminator placed after it."""
    return _ReverseGradient.apply(inputs, scale)
