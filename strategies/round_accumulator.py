"""The running accumulator of a streaming round for the linear rules (fedavg, task_arithmetic,
fednova): each Δ_t is folded in as it arrives, then dropped.

    A = Σ_t c_t Δ_t,        c_t = g · u_t,        u_t = w_t / d_t

    w_t = 1 (``weighting = uniform``) or n_t (``examples``);  p_t = w_t / Σ_i w_i
    fedavg, task_arithmetic:  d_t = 1,          g = 1 / Σ_i w_i                 (c_t = p_t)
    fednova:                  d_t = ‖a_t‖₁,     g = τ_eff / Σ_i w_i,  τ_eff = Σ_i p_i ‖a_i‖₁

u_t is known when client t's reply arrives (its n_t and ‖a_t‖₁ are in the reply's metrics); g
needs every replying client (which clients replied, Σ w_i, τ_eff), so the fold keeps the
unnormalised sum

    S = Σ_t u_t Δ_t        (float64, one tensor per floating-point tensor of θʳ)

and the round's end applies g and β:  θʳ⁺¹ = θʳ + β g S  (``merged``), or A = g S for a β search
(``update``). g is not recomputed here: it is read off the rule's own c_t (built from the replies'
metrics exactly as the in-memory path builds them), g = Σ_t c_t / Σ_t u_t, and c_t = g u_t is
checked for every t, so a linear rule whose c_t are not of this form is refused instead of being
folded wrongly.

Why float64: replies arrive in any order, and a float64 running sum rounded once to the model's
dtype at the end gives the same θʳ⁺¹ whatever the order (up to float64 rounding, far below the
float32 step). The in-memory path adds Σ_t (β c_t) Δ_t to θʳ in float32 in task order, so the two
agree to float32 tolerance, not bit for bit. Memory: S is twice a float32 model, whatever T.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fl_sim.errors import ConfigError, FlSimError
from strategies.streaming import CPU_CHUNK, TensorPlan, check_equal_buffers, intra_op_threads

COEFFICIENT_RTOL = 1e-9  # c_t = g u_t, checked in float64


class LinearFold:
    """S = Σ_t u_t Δ_t over the replies folded so far (module docstring)."""

    def __init__(self, theta: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.theta = theta
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.factors: dict[int, float] = {}  # task t → u_t
        self._row = torch.empty(CPU_CHUNK, dtype=torch.float64)  # Δ_t widened, chunk by chunk

    def add(self, t: int, factor: float, update: Mapping[str, torch.Tensor], client: str) -> None:
        """S ← S + u_t Δ_t; integer buffers must equal θʳ's (they are copied, not merged)."""
        if t in self.factors:
            raise FlSimError(f"{client}: folded twice in one round")
        if not math.isfinite(factor):
            raise ConfigError(f"{client}: fold factor u_t must be finite, got {factor}")
        with intra_op_threads(self.device):
            self._add(factor, update, client)
        self.factors[t] = float(factor)

    def _add(self, factor: float, update: Mapping[str, torch.Tensor], client: str) -> None:
        for name, base in self.theta.items():
            delta = update[name]
            if not base.is_floating_point():
                plan = TensorPlan(name, tuple(base.shape), base.dtype)
                check_equal_buffers(plan, base.reshape(-1), [delta.reshape(-1)], [client])
                continue
            total = self.sums.get(name)
            if total is None:
                total = self.sums[name] = torch.zeros(
                    base.shape, dtype=torch.float64, device=self.device
                )
            if self.device.type != "cpu":
                total.add_(delta.to(self.device, non_blocking=True), alpha=factor)
                continue
            # Δ_t widened one cache-sized chunk at a time into a reused float64 row, then added:
            # 5× faster than a mixed-dtype add_ on the CPU, and no float64 copy of Δ_t is made
            flat, source = total.view(-1), delta.reshape(-1)
            for start in range(0, flat.numel(), CPU_CHUNK):
                stop = min(start + CPU_CHUNK, flat.numel())
                row = self._row[: stop - start]
                row.copy_(source[start:stop])
                flat[start:stop].add_(row, alpha=factor)

    def scale(self, tasks: Sequence[int], coefficients: torch.Tensor) -> float:
        """g from the rule's c_t (in ``tasks`` order), checked: c_t = g u_t for every t."""
        u = torch.tensor([self.factors[t] for t in tasks], dtype=torch.float64)
        c = coefficients.to(dtype=torch.float64, device="cpu").flatten()
        if sorted(tasks) != sorted(self.factors) or c.numel() != u.numel():
            raise FlSimError(
                f"fold: coefficients for clients {list(tasks)}, folded {sorted(self.factors)}"
            )
        if float(u.sum()) == 0.0:
            return 0.0
        g = float(c.sum() / u.sum())
        if not torch.allclose(c, g * u, rtol=COEFFICIENT_RTOL, atol=0.0):
            raise FlSimError(
                f"fold: the rule's coefficients {c.tolist()} are not g·u_t for u = {u.tolist()}; "
                "this rule cannot be folded (set server-streaming = false)"
            )
        return g

    def merged(self, scale: float, beta: float, *, zero_base: bool) -> dict[str, torch.Tensor]:
        """θʳ + β g S in θʳ's dtypes (``zero_base``: β g S alone, θʳ's integer buffers kept);
        each sum is freed as soon as its tensor is done."""
        out: dict[str, torch.Tensor] = {}
        alpha = beta * scale
        for name, base in self.theta.items():
            if not base.is_floating_point():
                out[name] = base.clone()
                continue
            total = self.sums.pop(name)
            if zero_base:
                value = total.mul_(alpha)
            else:
                value = total.mul_(alpha).add_(base.to(self.device, non_blocking=True))
            if not bool(torch.isfinite(value).all()):
                raise ConfigError(
                    f"the merged tensor {name!r} overflowed to NaN/Inf with server_lr={beta} "
                    "although every input is finite; use a smaller server-lr/lambda"
                )
            out[name] = value.to(device="cpu", dtype=base.dtype)
            del total, value
        return out


def fold_factor(num_examples: int, a_norm: float, *, weighted: bool, normalised: bool) -> float:
    """u_t = w_t / d_t: w_t = n_t when ``weighted`` (else 1), d_t = ‖a_t‖₁ when ``normalised``.

    A ‖a_t‖₁ that is not finite and > 0 gives 0 here: the rule refuses it when the round ends
    (strategies/fednova.py ``check_a_norm``), with the same error as the in-memory path."""
    w = float(num_examples) if weighted else 1.0
    if not normalised:
        return w
    a = float(a_norm)
    return w / a if math.isfinite(a) and a > 0 else 0.0


__all__ = ["LinearFold", "fold_factor"]
