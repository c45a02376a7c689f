import pytest
import torch

from advframe import models
from advframe.errors import ConfigError


@pytest.mark.parametrize("name, args, shape", [
    ("small-cnn", {"batch_norm": False}, (1, 28, 28)),
    ("small-cnn", {"batch_norm": True}, (3, 32, 32)),
    ("mlp", {"hidden": [32]}, (1, 8, 8)),
    ("preact-resnet18", {}, (3, 32, 32)),
    ("resnet18", {}, (3, 32, 32)),
    ("wide-resnet", {"depth": 10, "width": 1}, (3, 32, 32)),
])
def test_every_architecture_maps_inputs_to_logits(name, args, shape):
    model = models.build({"name": name, "args": args}, shape, 7)
    model.eval()
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_a_user_callable_is_a_model():
    model = models.build({"name": "torch.nn:Flatten", "args": {}}, (1, 2, 2), 4)
    assert isinstance(model, torch.nn.Flatten)
    with pytest.raises(ConfigError, match="cannot import model"):
        models.build({"name": "no_such_module:f", "args": {}}, (1, 2, 2), 4)
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        models.build({"name": "resnet-18", "args": {}}, (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="does not accept"):
        models.build({"name": "small-cnn", "args": {"depth": 3}}, (1, 28, 28), 10)


def test_auxiliary_batchnorm_routes_and_keeps_separate_statistics():
    torch.manual_seed(0)
    model = models.with_auxiliary_bn(models.build({"name": "resnet18", "args": {}}, (3, 16, 16), 10))
    dual = [m for m in model.modules() if isinstance(m, models.DualBatchNorm)]
    assert len(dual) > 10
    model.train()
    model(torch.rand(8, 3, 16, 16))  # main statistics see clean-looking data
    with models.batchnorm_route(model, "aux"):
        model(torch.rand(8, 3, 16, 16) * 0.1 + 0.9)  # aux statistics see another distribution
    assert all(layer.route == "main" for layer in dual)
    first = dual[0]
    assert not torch.allclose(first.main.running_mean, first.aux.running_mean)
    assert {"stem.1.main.running_mean", "stem.1.aux.running_mean"} <= set(model.state_dict())
    with pytest.raises(ConfigError, match="no BatchNorm"):
        models.with_auxiliary_bn(models.build({"name": "small-cnn", "args": {"batch_norm": False}}, (1, 28, 28), 10))


def test_eval_mode_restores_each_submodule():
    model = models.build({"name": "small-cnn", "args": {"batch_norm": True}}, (1, 28, 28), 10)
    model.train()
    model.features[1].eval()
    with models.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.features[1].training


def test_penultimate_features_are_the_last_linear_input():
    model = models.build({"name": "small-cnn", "args": {"hidden": 16}}, (1, 28, 28), 10)
    assert models.penultimate_features(model, torch.rand(3, 1, 28, 28)).shape == (3, 16)


def test_the_segmentation_encoder_keeps_a_spatial_map():
    encoder = models.build({"name": "seg-encoder", "args": {}}, (1, 56, 56), 2)
    assert encoder(torch.rand(2, 1, 56, 56)).shape == (2, 32, 14, 14)


def test_reverse_gradient_is_the_identity_forward_and_flips_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    y = models.reverse_gradient(x, 0.5)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, -0.5))
