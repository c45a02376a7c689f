"""The neural-ODE block (advframe.ode) PNODE and R-PNODE put after their encoder."""

import torch

from advframe.ode import ODEBlock


def block(**settings):
    torch.manual_seed(0)
    return ODEBlock(8, **{"zero_init": False, "steps": 4, **settings})


def test_the_ode_output_changes_with_integration_time_and_gradients_reach_it():
    z = torch.randn(2, 8, 6, 6)
    ode = block()
    at_4 = ode(z)
    ode.time = 1.0
    at_1 = ode(z)
    ode.time = 1e-6
    assert not torch.allclose(at_4, at_1, atol=1e-3) and not torch.allclose(at_4, z, atol=1e-3)
    assert torch.allclose(ode(z), z, atol=1e-4)  # z(T) -> z(0) as T -> 0
    ode.time = 4.0
    z.requires_grad_(True)
    ode(z).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ode.parameters())
    assert z.grad.abs().sum() > 0  # attacks differentiate through the solver


def test_zero_init_starts_as_the_identity_and_still_learns():
    z = torch.randn(2, 8, 6, 6)
    ode = ODEBlock(8)
    assert torch.equal(ode(z), z)
    ode(z).pow(2).sum().backward()
    assert ode.func.norms[-1].weight.grad.abs().sum() > 0


def test_fixed_step_and_adaptive_solvers_agree():
    z = torch.randn(2, 8, 6, 6)
    rk4 = block(steps=16)(z)
    dopri5 = block(solver="dopri5", rtol=1e-5, atol=1e-5)(z)
    euler = block(solver="euler", steps=1)(z)
    assert (rk4 - dopri5).abs().max() < 0.05 < (euler - dopri5).abs().max()
    assert (rk4 - dopri5).abs().mean() * 20 < (euler - dopri5).abs().mean()
