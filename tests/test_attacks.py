import pytest
import torch
import torch.nn.functional as F

from advframe import attacks, models


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for a few seconds on digits (about 90% clean accuracy)."""
    from advframe import data

    splits = data.load({"name": "digits"})
    torch.manual_seed(0)
    model = models.build({"name": "small-cnn", "args": {"width": 16, "hidden": 64, "batch_norm": False}},
                         splits.input_shape, 10)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for inputs, labels in splits.train.batches(64):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    inputs, labels = splits.test.batch(torch.arange(200))
    return model, inputs, labels


def accuracy(model, inputs, labels):
    with torch.no_grad():
        return (model(inputs).argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("norm, eps", [("linf", 0.15), ("l2", 1.5), ("l1", 8.0)])
def test_pgd_stays_in_the_ball_and_the_box_and_lowers_accuracy(trained, norm, eps):
    model, inputs, labels = trained
    clean = accuracy(model, inputs, labels)
    adversarial = attacks.pgd(model, inputs, labels, eps=eps, alpha=eps / 4, steps=10, norm=norm,
                              generator=torch.Generator().manual_seed(0))
    delta = (adversarial - inputs).flatten(1)
    size = {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1), "l1": delta.abs().sum(1)}[norm]
    assert size.max() <= eps * (1 + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert clean > 0.85
    assert accuracy(model, adversarial, labels) < clean - 0.3


def test_pgd_leaves_no_parameter_gradients_and_restores_mode(trained):
    model, inputs, labels = trained
    model.train()
    attacks.pgd(model, inputs[:8], labels[:8], eps=0.1, alpha=0.02, steps=2)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()


def test_early_stopping_never_raises_robust_accuracy(trained):
    model, inputs, labels = trained
    settings = dict(eps=0.1, alpha=0.025, steps=10, generator=None)
    full = attacks.pgd(model, inputs, labels, **settings)
    early = attacks.pgd(model, inputs, labels, stop_on_success=True, **settings)
    assert accuracy(model, early, labels) <= accuracy(model, full, labels) + 1e-9


def test_restarts_only_add_successes(trained):
    model, inputs, labels = trained
    one = attacks.pgd(model, inputs, labels, eps=0.08, alpha=0.02, steps=5, generator=torch.Generator().manual_seed(1))
    three = attacks.pgd(model, inputs, labels, eps=0.08, alpha=0.02, steps=5, restarts=3,
                        generator=torch.Generator().manual_seed(1))
    assert accuracy(model, three, labels) <= accuracy(model, one, labels)


def test_targeted_pgd_reaches_the_target(trained):
    model, inputs, labels = trained
    targets = (labels + 1) % 10
    adversarial = attacks.pgd(model, inputs, targets, eps=0.3, alpha=0.05, steps=20, targeted=True)
    with torch.no_grad():
        hit = (model(adversarial).argmax(1) == targets).float().mean().item()
    assert hit > 0.6


def test_seeded_pgd_is_reproducible(trained):
    model, inputs, labels = trained
    runs = [attacks.pgd(model, inputs[:20], labels[:20], eps=0.1, alpha=0.02, steps=3,
                        generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*runs)


def test_l1_projection_is_the_euclidean_projection():
    torch.manual_seed(0)
    delta = torch.randn(4, 30)
    projected = attacks.project_l1(delta, 2.0)
    assert torch.allclose(projected.abs().sum(1), torch.full((4,), 2.0), atol=1e-5)
    # optimality: no point of the ball on a random segment is closer
    for _ in range(20):
        other = attacks.project_l1(projected + 0.3 * torch.randn(4, 30), 2.0)
        assert ((other - delta).norm(dim=1) >= (projected - delta).norm(dim=1) - 1e-5).all()


def test_box_projection_keeps_gradients_on_saturated_pixels(trained):
    """The pitfall Free AT's notes measured: clamping x + delta in the forward pass kills the gradient
    where x is 0 or 1; projecting delta keeps it."""
    model, inputs, labels = trained
    delta = torch.zeros_like(inputs, requires_grad=True)
    F.cross_entropy(model(inputs + delta), labels).backward()
    saturated = inputs == 0
    assert delta.grad[saturated].abs().sum() > 0
    projected = attacks.project(torch.full_like(inputs, -0.1), inputs, 0.2)
    assert ((inputs + projected) >= 0).all() and (projected[saturated] == 0).all()


def test_boundary_pgd_stops_each_example_at_the_boundary(trained):
    model, inputs, labels = trained
    points = attacks.boundary_pgd(model, inputs, labels, eps=0.3, alpha=0.03, steps=20,
                                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean_ok = model(inputs).argmax(1) == labels
        last_clean_ok = model(points.last_clean).argmax(1) == labels
        first_adv_wrong = model(points.first_adversarial).argmax(1) != labels
    crossed = points.flip_step >= 0
    assert crossed.float().mean() > 0.8
    assert last_clean_ok[clean_ok & crossed].all(), "every last-clean point is still correct"
    assert first_adv_wrong[points.stopped].all(), "every stopped first-adversarial point is wrong"
    assert (points.flip_step[~clean_ok] == 0).all()
    for points_set in (points.last_clean, points.first_adversarial):
        assert (points_set - inputs).abs().max() <= 0.3 + 1e-6 and points_set.min() >= 0
    # examples need different numbers of steps: the attack strength adapts per example
    assert points.flip_step[crossed].float().std() > 0.5


def test_step_size_defaults_to_madrys_rule():
    assert attacks.step_size({"eps": 0.3, "steps": 10, "alpha": None}) == pytest.approx(0.075)
    assert attacks.step_size({"eps": 0.3, "steps": 10, "alpha": 0.01}) == 0.01
