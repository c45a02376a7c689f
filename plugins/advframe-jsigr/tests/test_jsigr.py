from types import SimpleNamespace

import advframe_jsigr as jsigr
import pytest
import torch
from torch import nn

from advframe import PluginError
from advframe.testing import assert_conforms, tiny_run

NAME = "jsigr"


@pytest.mark.parametrize("overrides", [[], ["mask_kind=rise", "rise_masks=4"], ["mask_refresh_epochs=1"],
                                       ["adversarial_weight=0.5", "projections=2"]])
def test_contract(tmp_path, overrides):
    assert_conforms(jsigr, NAME, tmp_path, overrides=[f"plugins.{NAME}.{o}" for o in overrides])


class Corner(nn.Module):
    """A linear model that only looks at the top-left 7x7 patch of a 28x28 image."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(10, 1, 28, 28))
        with torch.no_grad():
            self.weight[:, :, :7, :7] = torch.randn(10, 1, 7, 7, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.weight)


def test_occlusion_mask_marks_the_region_the_model_uses():
    model = Corner()
    inputs = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(inputs).argmax(1)  # occluding the corner lowers p_y of the predicted class
    settings = {**jsigr.default_config(), "mask_quantile": 1 / 16, "occlusion_patch": 7}
    mask = jsigr.saliency_mask(model, inputs, labels, settings, torch.Generator())
    assert not mask.requires_grad
    assert torch.equal(mask.sum((1, 2, 3)), torch.full((6,), 49.0))  # exactly the quantile: one 7x7 patch
    assert torch.equal(mask[:, :, :7, :7], torch.ones(6, 1, 7, 7))


def test_rise_mask_has_the_quantile_and_favours_the_used_region():
    model = Corner()
    inputs = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    settings = {**jsigr.default_config(), "mask_kind": "rise", "rise_masks": 64, "mask_quantile": 0.25}
    mask = jsigr.saliency_mask(model, inputs, labels, settings, torch.Generator().manual_seed(0))
    assert torch.equal(mask.sum((1, 2, 3)), torch.full((4,), 196.0))
    assert mask[:, :, :7, :7].mean() > 2 * mask.mean()


def test_jacobian_projection_estimate_is_unbiased():
    """For a linear map z = W x, ||J||_F^2 = ||W||_F^2; the random-projection estimate averages to it."""
    layer = nn.Linear(20, 10, bias=False)
    inputs = torch.rand(4000, 20, requires_grad=True)
    estimate = jsigr.jacobian_penalty(layer(inputs), inputs, 1, torch.Generator().manual_seed(0))
    exact = layer.weight.pow(2).sum()
    assert estimate.mean().item() == pytest.approx(exact.item(), rel=0.05)
    assert estimate.requires_grad  # differentiable: double backpropagation reaches the weights


def test_mask_cache_reuses_masks_until_they_are_stale():
    model = Corner()
    inputs = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    settings = {**jsigr.default_config(), "mask_refresh_epochs": 2}
    ctx = SimpleNamespace(epoch=0, generator=torch.Generator())
    cache = jsigr.MaskCache()
    first = cache.get(model, inputs, labels, settings, ctx)
    with torch.no_grad():
        model.weight.copy_(model.weight.flip(-1, -2))  # the model now looks at the opposite corner
    fresh = jsigr.saliency_mask(model, inputs, labels, settings, ctx.generator)
    assert not torch.equal(fresh, first)
    ctx.epoch = 1  # younger than 2 epochs: kept, whatever batch the examples come in
    assert torch.equal(cache.get(model, inputs[[4, 0]], labels[[4, 0]], settings, ctx), first[[4, 0]])
    ctx.epoch = 2  # stale: recomputed with the current model
    assert torch.equal(cache.get(model, inputs, labels, settings, ctx), fresh)


def test_regulariser_lowers_the_input_gradient_norm(tmp_path):
    """Same data, model and steps: J-SIGR's penalties shrink ||grad_x log p_y|| on test inputs."""
    common = ["data.train_size=256", "train.epochs=3", "train.monitor_examples=0", "eval.attacks=[]",
              f"plugins.{NAME}.eval_examples=48"]
    plain = tiny_run(jsigr, NAME, tmp_path / "plain", overrides=[
        *common, f"plugins.{NAME}.jacobian_weight=0.0", f"plugins.{NAME}.saliency_weight=0.0"])
    regular = tiny_run(jsigr, NAME, tmp_path / "jsigr", overrides=[
        *common, f"plugins.{NAME}.jacobian_weight=0.5", f"plugins.{NAME}.saliency_weight=10.0"])
    assert regular["metrics"]["input_gradient_norm"] < 0.7 * plain["metrics"]["input_gradient_norm"]
    assert regular["metrics"]["jacobian_frobenius_norm"] < plain["metrics"]["jacobian_frobenius_norm"]
    assert (tmp_path / "jsigr" / "jsigr_saliency.png").stat().st_size > 1000


@pytest.mark.parametrize("setting", ["mask_kind=gradcam", "mask_quantile=1.0", "projections=0",
                                     "adversarial_weight=2.0", "saliency_weight=-1.0"])
def test_bad_settings_raise_one_clear_error(tmp_path, setting):
    with pytest.raises(PluginError, match="jsigr"):
        tiny_run(jsigr, NAME, tmp_path / "run", overrides=[f"plugins.{NAME}.{setting}"])


def test_text_inputs_are_refused_with_one_clear_error(tmp_path):
    rows = [f"{label}\t{word} {word}" for label, word in [("pos", "good"), ("neg", "bad")] * 8]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.tsv").write_text("pos\tgood\nneg\tbad\n")
    with pytest.raises(PluginError, match="token ids"):
        tiny_run(jsigr, NAME, tmp_path / "run", overrides=[
            "data.name=text", f"data.root={tmp_path}", "data.max_length=3", "data.train_size=null",
            "data.test_size=null", "model.name=text-classifier", "model.args={embedding_dim: 8, channels: 8}"])


@pytest.mark.parametrize("overrides, per_example", [
    ([], 1 + 2 + 2),  # forward/backward; input gradient + its double backprop; one Jacobian projection (both)
    (["saliency_weight=0"], 1 + 1 + 2),  # the input gradient is still taken (logged), not backpropagated
    (["jacobian_weight=0", "saliency_weight=0"], 1 + 1),
    (["projections=3"], 1 + 2 + 3 * 2),
])
def test_cost_counts_the_double_backpropagation(tmp_path, overrides, per_example):
    results = tiny_run(jsigr, NAME, tmp_path / "run",
                       overrides=["data.train_size=96", *[f"plugins.{NAME}.{o}" for o in overrides]])
    assert results["cost"]["gradient_evaluations"] == per_example * 96
    assert results["cost"]["forward_passes"] > 0  # the occlusion mask's probes, counted apart
