import typing
import warnings

import advframe_apgd
import pytest
import torch
from advframe_apgd import autoattack, fab, masking
from torch import nn

from advframe import PluginError, hookimpl
from advframe.errors import CheckpointError
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

FAST = ["plugins.autoattack.steps=10", "plugins.autoattack.target_classes=3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_apgd_contract(tmp_path):
    assert_conforms(advframe_apgd, "apgd", tmp_path, overrides=["plugins.apgd.steps=10"])


def test_autoattack_contract(tmp_path):
    assert_conforms(autoattack, "autoattack", tmp_path,
                    overrides=[*FAST, "plugins.autoattack.components=[apgd-ce, apgd-t, fab-t]"])


def test_fab_contract(tmp_path):
    assert_conforms(fab, "fab", tmp_path, overrides=["plugins.fab.steps=10", "plugins.fab.target_classes=2"])


def test_gradient_masking_contract(tmp_path):
    overrides = ["plugins.gradient-masking.steps=3", "plugins.gradient-masking.apgd_steps=5",
                 "plugins.gradient-masking.black_box=''"]
    assert_conforms(masking, "gradient-masking", tmp_path, overrides=overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A natural model trained on digits for a few epochs through the real runner."""
    host = make_host((advframe_apgd, "apgd"), (autoattack, "autoattack"), (masking, "gradient-masking"))
    config = tiny_config(host, "erm", ["data.train_size=1000", "data.test_size=200", "train.epochs=6",
                                       "train.lr=0.003", "train.monitor_examples=0", "attack.name=apgd",
                                       "eval.attacks=[{name: apgd}]"])
    run = Run.start(host, config, tmp_path_factory.mktemp("erm") / "run")
    run.train()
    run.model.eval()
    return run


def batch(run, size=200):
    return run.splits.test.batch(torch.arange(size))


def accuracy(model, inputs, labels):
    with torch.no_grad():
        return (model(inputs).argmax(1) == labels).float().mean().item()


def attack(run, name, inputs, labels, **overrides):
    return run.ctx.attack(run.model, inputs, labels, run.ctx.attack_settings(name, **overrides))


@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-targeted"])
@pytest.mark.parametrize("norm, eps", [("linf", 0.15), ("l2", 1.2)])
def test_apgd_stays_in_ball_and_box_and_lowers_accuracy(trained, loss, norm, eps):
    inputs, labels = batch(trained)
    adversarial = attack(trained, "apgd", inputs, labels, loss=loss, norm=norm, eps=eps, steps=20, target_classes=3)
    delta = (adversarial - inputs).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    clean = accuracy(trained.model, inputs, labels)
    assert clean > 0.8
    assert accuracy(trained.model, adversarial, labels) < clean - 0.3


def test_targeted_apgd_reaches_the_targets(trained):
    inputs, labels = batch(trained, 100)
    targets = (labels + 3) % 10
    for loss in ("ce", "dlr"):
        adversarial = attack(trained, "apgd", inputs, targets, loss=loss, eps=0.3, steps=30, targeted=True)
        with torch.no_grad():
            assert (trained.model(adversarial).argmax(1) == targets).float().mean() > 0.6


def test_apgd_is_seeded(trained):
    inputs, labels = batch(trained, 64)
    results = []
    for _ in range(2):
        trained.ctx.generator.manual_seed(7)
        results.append(attack(trained, "apgd", inputs, labels, eps=0.1, steps=10, restarts=2, loss="dlr"))
    assert torch.equal(*results)


def test_stopping_on_success_leaves_robust_accuracy_unchanged(trained):
    # on correctly classified inputs both modes draw the same random starts, so every example walks the
    # same trajectory: freezing broken ones changes the time, never which examples break
    inputs, labels = batch(trained)
    with torch.no_grad():
        right = trained.model(inputs).argmax(1) == labels
    inputs, labels = inputs[right], labels[right]
    robust = []
    for stop in (True, False):
        trained.ctx.generator.manual_seed(3)
        adversarial = attack(trained, "apgd", inputs, labels, eps=0.1, steps=25, stop_on_success=stop)
        robust.append(trained.model(adversarial).argmax(1) == labels)
    assert 0 < robust[0].float().mean() < 1
    assert torch.equal(robust[0], robust[1])


def test_step_size_halves_at_checkpoints_so_the_walk_settles_on_an_interior_maximum():
    # the loss peaks inside the ball, 0.03 from the input: a fixed step of 2 eps would jump between the
    # faces of the ball forever; APGD's checkpoints halve the step until the walk settles on the peak
    inputs = torch.full((3, 1, 2, 2), 0.5)
    peak = inputs + torch.tensor([0.03, -0.02, 0.01, 0.0]).view(1, 1, 2, 2)
    seen = []

    class Bowl(nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return torch.stack([-(x - peak[: len(x)]).flatten(1).pow(2).sum(1), torch.zeros(len(x))], 1)

    never = lambda logits, rows: torch.zeros(len(rows), dtype=torch.bool)
    outcome = advframe_apgd.single_run(Bowl(), inputs, torch.arange(3), lambda logits, rows: logits[:, 0], never,
                                       eps=0.1, norm="linf", steps=100, rho=0.75, momentum=0.75,
                                       stop_on_success=False, start=torch.zeros_like(inputs))
    assert (outcome.adversarial - peak).abs().max() < 0.005
    assert outcome.best_loss.min() > -1e-4
    assert len(seen) == 101  # one gradient at the start and one per step


def test_bad_settings_are_user_errors(trained):
    inputs, labels = batch(trained, 4)
    with pytest.raises(PluginError, match="norm must be linf or l2"):
        attack(trained, "apgd", inputs, labels, norm="l1", eps=5.0)
    with pytest.raises(PluginError, match="loss must be one of"):
        attack(trained, "apgd", inputs, labels, loss="hinge")
    with pytest.raises(PluginError, match="target_classes"):
        attack(trained, "apgd", inputs, labels, loss="dlr-targeted", target_classes=0)
    with pytest.raises(PluginError, match="targeted mode is not supported"):
        attack(trained, "autoattack", inputs, labels, targeted=True)


# -- autoattack ---------------------------------------------------------------------------------------

def robust_accuracy(run, name, inputs, labels, **overrides):
    run.ctx.generator.manual_seed(11)
    adversarial = attack(run, name, inputs, labels, **overrides)
    with torch.no_grad():
        clean = run.model(inputs).argmax(1) == labels
        return (clean & (run.model(adversarial).argmax(1) == labels)).float().mean().item(), adversarial


def test_autoattack_worst_case_is_never_above_any_component(trained):
    inputs, labels = batch(trained)
    settings = {"eps": 0.08, "steps": 15, "target_classes": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ensemble, adversarial = robust_accuracy(trained, "autoattack", inputs, labels,
                                                components=["apgd-ce", "apgd-t", "fab-t", "margin-t"], **settings)
        singles = {c: robust_accuracy(trained, "autoattack", inputs, labels, components=[c], **settings)
                   for c in ("apgd-ce", "apgd-t", "fab-t", "margin-t")}
    assert (adversarial - inputs).abs().max() <= 0.08 + 1e-6
    assert ensemble <= min(accuracy for accuracy, _ in singles.values())
    assert ensemble < accuracy(trained.model, inputs, labels) - 0.2
    # per example: the first component draws the same starts alone and in the ensemble, so every
    # example it breaks alone stays broken in the ensemble
    with torch.no_grad():
        alone = trained.model(singles["apgd-ce"][1]).argmax(1) != labels
        together = trained.model(adversarial).argmax(1) != labels
    assert (together | ~alone).all()


class FakeSquare:
    """A stand-in ``square`` plugin that records which examples AutoAttack hands it and breaks none."""

    __name__ = "tests.FakeSquare"
    batches: typing.ClassVar[list[tuple[int, int]]] = []

    @staticmethod
    @hookimpl
    def default_config():
        return {"budget": 100, "p_init": 0.3}

    @staticmethod
    @hookimpl
    def generate_perturbation(inputs, params):
        FakeSquare.batches.append((len(inputs), params["budget"]))
        return inputs.clone()


def test_autoattack_reports_components_and_runs_each_on_the_still_robust_points(tmp_path):
    host = make_host((autoattack, "autoattack"), (FakeSquare(), "square"))
    entry = "{name: autoattack, eps: 0.06, steps: 10, target_classes: 2, square: {budget: 50}}"
    config = tiny_config(host, "erm", ["data.train_size=600", "data.test_size=100", "train.epochs=4",
                                       "train.monitor_examples=0", "train.lr=0.003", "eval.evaluators=[autoattack]",
                                       f"eval.attacks=[{entry}]"])
    FakeSquare.batches.clear()
    results = Run.start(host, config, tmp_path / "run").execute()
    metrics = results["metrics"]
    components = ("apgd-ce", "apgd-t", "fab-t", "square")
    after = [metrics[f"autoattack-linf-0.06-10/robust_accuracy_after/{c}"] for c in components]
    assert after == sorted(after, reverse=True)  # cumulative: never rises
    assert after[-1] == pytest.approx(metrics["robust_accuracy"])
    assert metrics["autoattack-linf-0.06-10/robust_accuracy"] == pytest.approx(metrics["robust_accuracy"])
    assert metrics["clean_accuracy"] > after[0]
    # Square saw only the examples the three white-box components left robust, with the override
    robust_left = round(after[2] * 100)
    assert sum(size for size, _ in FakeSquare.batches) == robust_left
    assert all(queries == 50 for _, queries in FakeSquare.batches)


def test_autoattack_without_square_installed_is_an_error_that_names_it(tmp_path):
    host = make_host((autoattack, "autoattack"))
    config = tiny_config(host, "erm", ["eval.evaluators=[autoattack]",
                                       "eval.attacks=[{name: autoattack, steps: 5, components: [apgd-ce, square]}]"])
    with pytest.raises(PluginError, match="needs the square plugin, which is not installed"):
        Run.start(host, config, tmp_path / "run").execute()


# -- FAB-T ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_boxed_projection_reaches_the_hyperplane_with_the_smallest_step_inside_the_box(norm):
    generator = torch.Generator().manual_seed(0)
    points, w = torch.rand(300, 40, generator=generator), torch.randn(300, 40, generator=generator)
    w[:, :4] = 0  # coordinates that cannot help must not move
    b = (w * points).sum(1) + 20 * torch.randn(300, generator=generator)
    step = fab.boxed_projection(points, w, b, norm)
    gap = b - (w * points).sum(1)
    room = torch.where(torch.sign(w) * torch.sign(gap)[:, None] > 0, 1 - points, points)
    feasible = (w.abs() * room).sum(1) >= gap.abs()
    assert 0.3 < feasible.float().mean() < 1  # both cases occur
    reached = (w * (points + step)).sum(1) - b
    assert reached.abs().max() < 1e-4  # infeasible rows ignore the box, as the reference
    inside = points[feasible] + step[feasible]
    assert inside.min() >= -1e-6 and inside.max() <= 1 + 1e-6
    assert (step[:, :4] == 0).all()
    if norm == "linf":  # a step any smaller cannot reach the hyperplane
        size = step.abs().amax(1, keepdim=True)
        assert ((w.abs() * torch.minimum(room, 0.999 * size)).sum(1) < gap.abs())[feasible].all()
    else:  # optimality: the coordinates not at the box all move by the same multiple of w
        multiple = step / (w * torch.sign(gap)[:, None])
        free = (step.abs() < room - 1e-5) & (w != 0) & feasible[:, None]
        spread = [multiple[i][free[i]].max() - multiple[i][free[i]].min() for i in range(300) if free[i].sum() > 1]
        assert max(spread) < 1e-5


def test_fab_t_finds_small_perturbations(trained):
    inputs, labels = batch(trained, 100)
    # a huge budget: FAB-T still returns the smallest adversarial point it met on its way to the boundary
    adversarial, broken = fab.fab_targeted(trained.model, inputs, labels, eps=1.0, steps=30, target_classes=2)
    with torch.no_grad():
        clean = trained.model(inputs).argmax(1) == labels
        wrong = trained.model(adversarial).argmax(1) != labels
    assert broken.float().mean() > 0.9 * clean.float().mean()
    assert (wrong | ~broken).all() and not (broken & ~clean).any()
    size = (adversarial - inputs)[broken].flatten(1).abs().amax(1)
    pgd_size = 0.15  # PGD at this eps leaves about a third of these examples robust (see above)
    assert size.median() < pgd_size
    # within a budget, FAB-T breaks no example beyond it
    capped, broken_capped = fab.fab_targeted(trained.model, inputs, labels, eps=0.08, steps=30, target_classes=2)
    assert (capped - inputs).abs().max() <= 0.08 + 1e-6
    assert broken_capped.sum() < broken.sum()


# -- gradient masking ---------------------------------------------------------------------------------

class Quantised(nn.Module):
    """Rounds its input before the classifier: gradients are zero everywhere (shattered gradients)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


class Softmaxed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(1)


def masking_metrics(run, model):
    dataset = run.splits.test
    run.ctx.generator.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run.ctx.call("evaluate", "gradient-masking", model=model, dataset=dataset)


@pytest.fixture(scope="module")
def masking_run(trained, tmp_path_factory):
    host = trained.host
    config = tiny_config(host, "erm", ["data.train_size=1000", "data.test_size=200", "attack.eps=0.15",
                                       "eval.evaluators=[gradient-masking]", "plugins.gradient-masking.apgd_steps=20",
                                       "plugins.gradient-masking.max_examples=150"])
    return Run.start(host, config, tmp_path_factory.mktemp("masking") / "run")


def with_settings(monkeypatch, run, **settings):
    plugins = run.config["plugins"]
    monkeypatch.setitem(plugins, "gradient-masking", {**plugins["gradient-masking"], **settings})


def is_nan(value):
    return value != value


def test_gradient_masking_flags_nothing_on_a_plain_model(trained, masking_run, monkeypatch):
    with_settings(monkeypatch, masking_run, surrogate=str(trained.out_dir))  # the model's own run
    metrics = masking_metrics(masking_run, trained.model)
    prefix = masking.PREFIX
    assert metrics[prefix + "flag_transfer_stronger"] == 0.0
    assert metrics[prefix + "transfer_robust_accuracy"] >= metrics[prefix + "white_box_robust_accuracy"]
    assert is_nan(metrics[prefix + "flag_eot_stronger"]) and is_nan(metrics[prefix + "eot_pgd_robust_accuracy"])
    assert metrics[prefix + "any_flag"] == 0.0
    assert metrics[prefix + "flag_zero_gradients"] == 0.0
    assert metrics[prefix + "flag_nonfinite_gradients"] == 0.0
    assert metrics[prefix + "flag_large_eps_not_broken"] == 0.0
    assert metrics[prefix + "flag_single_step_stronger"] == 0.0
    assert metrics[prefix + "flag_randomized_model"] == 0.0
    assert metrics[prefix + "flag_probability_outputs"] == 0.0
    assert metrics[prefix + "black_box_available"] == 0.0
    assert is_nan(metrics[prefix + "flag_black_box_stronger"])
    assert metrics[prefix + "large_eps_robust_accuracy"] < 0.05
    assert metrics[prefix + "pgd_robust_accuracy"] < metrics[prefix + "clean_accuracy"]


def test_gradient_masking_flags_a_model_with_shattered_gradients(trained, masking_run, monkeypatch):
    # the surrogate is the unquantised model: its gradients are useful and its examples transfer
    with_settings(monkeypatch, masking_run, surrogate=str(trained.out_dir))
    metrics = masking_metrics(masking_run, Quantised(trained.model))
    prefix = masking.PREFIX
    assert metrics[prefix + "flag_transfer_stronger"] == 1.0
    assert metrics[prefix + "transfer_robust_accuracy"] < metrics[prefix + "white_box_robust_accuracy"] - 0.3
    assert is_nan(metrics[prefix + "flag_eot_stronger"])  # deterministic
    assert metrics[prefix + "zero_gradient_fraction"] == 1.0
    assert metrics[prefix + "flag_zero_gradients"] == 1.0
    assert metrics[prefix + "flag_large_eps_not_broken"] == 1.0  # PGD cannot move without a gradient
    assert metrics[prefix + "flag_random_noise_stronger"] == 1.0  # noise breaks what PGD cannot
    assert metrics[prefix + "any_flag"] == 1.0


def test_gradient_masking_flags_probability_outputs(trained, masking_run):
    metrics = masking_metrics(masking_run, Softmaxed(trained.model))
    assert metrics[masking.PREFIX + "flag_probability_outputs"] == 1.0


class Noisy(nn.Module):
    """Adds Gaussian noise to its input at every forward pass, in eval mode too (a randomized defense)."""

    def __init__(self, model, sigma):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


def test_gradient_masking_flags_a_randomized_model_that_eot_breaks(trained, masking_run, monkeypatch):
    with_settings(monkeypatch, masking_run, apgd_steps=0, random_samples=0, eot_samples=10)
    torch.manual_seed(0)
    metrics = masking_metrics(masking_run, Noisy(trained.model, 0.2))
    prefix = masking.PREFIX
    assert metrics[prefix + "flag_randomized_model"] == 1.0
    assert metrics[prefix + "flag_eot_stronger"] == 1.0
    assert metrics[prefix + "eot_pgd_robust_accuracy"] < metrics[prefix + "pgd_robust_accuracy"] - 0.2
    assert is_nan(metrics[prefix + "flag_transfer_stronger"])  # no surrogate


def test_gradient_masking_surrogate_must_be_a_run_directory(trained, masking_run, monkeypatch, tmp_path):
    with_settings(monkeypatch, masking_run, surrogate=str(tmp_path))
    with pytest.raises(CheckpointError, match="not a run directory"):
        masking_metrics(masking_run, trained.model)
