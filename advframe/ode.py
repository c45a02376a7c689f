"""A neural-ODE block after an encoder, solved with torchdiffeq (PNODE, R-PNODE).

The features are the state of a learned flow at time T::

    F(x) = z(T),  z(0) = E(x),  dz/dt = f_psi(z(t), t)
    f_psi = GroupNorm -> layers x [ReLU -> conv3x3 on (z, t) (t as an extra channel) -> GroupNorm]

Gradients flow through the solver (or torchdiffeq's adjoint), so an attack on the wrapped model
differentiates through the same solver and tolerances as training. The settings a method exposes for
the block are :data:`ODE_DEFAULTS`; :func:`ode_encoder` builds the wrapped model from them in a
plugin's ``setup``. torchdiffeq is imported here only: a plugin using this module lists it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from advframe.errors import PluginError
from advframe.segmentation import check_feature_maps

FIXED_STEP = {"euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams"}
ADAPTIVE = {"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"}

ODE_DEFAULTS = {"ode_time": 4.0, "ode_layers": 3, "solver": "rk4", "steps": 8, "rtol": 1.0e-3, "atol": 1.0e-3,
                "max_steps": 1000, "adjoint": False, "zero_init": True}


def check_ode_settings(plugin: str, settings: dict) -> None:
    if settings["solver"] not in FIXED_STEP | ADAPTIVE:
        raise PluginError(f"{plugin}: plugins.{plugin}.solver must be a torchdiffeq method "
                          f"({', '.join(sorted(FIXED_STEP | ADAPTIVE))}), got {settings['solver']!r}")
    for key in ("ode_time", "rtol", "atol"):
        if not settings[key] > 0:
            raise PluginError(f"{plugin}: plugins.{plugin}.{key} must be > 0, got {settings[key]}")
    for key in ("ode_layers", "steps", "max_steps"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise PluginError(f"{plugin}: plugins.{plugin}.{key} must be a whole number >= 1, got {settings[key]!r}")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class TimeConv(nn.Module):
    """A 3x3 convolution that sees the time ``t`` as one more input channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([torch.ones_like(z[:, :1]) * t, z], 1))


class ODEFunc(nn.Module):
    """f_psi(z, t); with ``zero_init`` the last GroupNorm's scale starts at 0, so the flow starts as
    the identity map. ``nfe`` counts function evaluations (adaptive solvers need more as training
    goes on)."""

    def __init__(self, channels: int, layers: int = 3, zero_init: bool = True):
        super().__init__()
        self.norm = group_norm(channels)
        self.convs = nn.ModuleList(TimeConv(channels) for _ in range(layers))
        self.norms = nn.ModuleList(group_norm(channels) for _ in range(layers))
        if zero_init:
            nn.init.zeros_(self.norms[-1].weight)
        self.nfe = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.norm(z)
        for conv, norm in zip(self.convs, self.norms):
            out = norm(conv(t, F.relu(out)))
        return out


class ODEBlock(nn.Module):
    """z(0) -> z(T) with a torchdiffeq solver."""

    def __init__(self, channels: int, *, ode_time=4.0, ode_layers=3, solver="rk4", steps=8, rtol=1e-3, atol=1e-3,
                 max_steps=1000, adjoint=False, zero_init=True):
        super().__init__()
        self.func = ODEFunc(channels, ode_layers, zero_init)
        self.time, self.solver, self.steps = float(ode_time), solver, steps
        self.rtol, self.atol, self.max_steps, self.adjoint = rtol, atol, max_steps, adjoint

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        times = torch.tensor([0.0, self.time], dtype=z.dtype, device=z.device)
        if self.solver in ADAPTIVE:
            options = {"max_num_steps": self.max_steps}
        else:
            options = {"step_size": self.time / self.steps}
        solve = odeint_adjoint if self.adjoint else odeint
        return solve(self.func, z, times, rtol=self.rtol, atol=self.atol, method=self.solver, options=options)[-1]


class ODEEncoder(nn.Module):
    """The run's encoder followed by the ODE block: trained, saved and restored as one model."""

    def __init__(self, encoder: nn.Module, ode: ODEBlock):
        super().__init__()
        self.encoder, self.ode = encoder, ode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ode(self.encoder(x))


def ode_encoder(model: nn.Module, ctx) -> ODEEncoder:
    """``setup`` for a method with an ODE block: checks the block's settings (``ctx.settings``, keys of
    :data:`ODE_DEFAULTS`) and wraps the run's feature-map encoder."""
    check_ode_settings(ctx.current_plugin, ctx.settings)
    channels = check_feature_maps(model, ctx)
    return ODEEncoder(model, ODEBlock(channels, **{key: ctx.settings[key] for key in ODE_DEFAULTS}))
