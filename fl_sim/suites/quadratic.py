"""The ``quadratic`` suite: T quadratic tasks on one vector θ ∈ ℝ^d, the exact instrument for
the theory (docs/design.md, "The quadratic suite").

    L_t(θ) = ½ Σ_j h_t,j (θ_j − c_t,j)²,    h_t,j > 0

- Drawn once from one Generator seeded with ``seed``, in this order: a common centre
  c̄ ~ N(0, I_d); per task c_t = c̄ + ``spread`` · ε_t, ε_t ~ N(0, I_d) (``spread`` = 0: every
  task has the same minimiser; the gradient diversity ζ² grows with it) and curvatures
  h_t,j = exp(u_t,j · ln(``curvature_spread``) / 2), u_t,j ~ U[−1, 1], i.e. log-uniform on
  [1/√s, √s] for s = ``curvature_spread`` ≥ 1 (s = 1: h = 1; the default s = 4 gives [0.5, 2]
  as in the design doc's worked example); then θ₀ ~ N(0, I_d), the "pre-trained" model (from
  ``build_model(seed)``'s seed); then the noise vectors below.
- The model: a backbone holding one parameter ``theta`` (the federated key ``backbone.theta``)
  and per-task frozen heads holding c_t and h_t as buffers (never federated, rebuilt from the
  seed by every party). ``MultiTaskModel.objective`` is overridden, so every loss in fl-sim
  (local training, evaluation, ζ²) is L_t, not a cross-entropy.
- The "data": with ``noise`` σ = 0 every split of task t is one example x = 0, so any batch is
  the full batch and a step of SGD is θ ← θ − η h_t ⊙ (θ − c_t), the exact gradient of L_t.
  With σ > 0 the training split is N = 256 examples x_i = σ ξ_i (ξ_i ~ N(0, I_d), centred so that
  Σ_i ξ_i = 0) and an example's loss is L_t(θ) + ⟨x_i, θ⟩: a batch B's gradient is
  h_t ⊙ (θ − c_t) + σ · mean_{i∈B} ξ_i, seeded Gaussian gradient noise whose batches the client's
  minibatch generator draws (seed, round); the full batch (``full-batch = true``, or
  batch-size ≥ N) is exact again. Val and test are one x = 0 example: evaluation is exact.
- "accuracy" (what the compare/sweep machinery and the β search rank by) is the monotone score
  1 / (1 + L_t(θ)/d) ∈ (0, 1]: higher is better, 1 at c_t, comparable across d (L_t/d is the
  mean loss per coordinate), and it never underflows (exp(−L_t) would, at L_t in the hundreds).
- ``theory_metrics`` gives what the theory talks about at a federated state: each L_t, the
  average L = Σ p_t L_t, its gap to L(θ*_p), and ‖θ − θ*_p‖, ‖θ − θ*_w‖ with the closed forms
  θ*_p = Σ p_t h_t c_t / Σ p_t h_t and θ*_w the same with the effective weights w_t.
  ``problem_tensors`` is what a run writes to quadratic.safetensors (c, h, θ₀, p).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fl_sim.errors import ConfigError
from fl_sim.suites.base import FEDERATED_PREFIX, SPLITS, MultiTaskModel, TaskData, TaskSuite

PARAMETER = "theta"
FEDERATED_KEY = FEDERATED_PREFIX + PARAMETER  # "backbone.theta"
NOISE_EXAMPLES = 256  # N, the training split's size when σ > 0
MAX_DIM = 10_000_000  # a bound, so that a typo cannot allocate terabytes


class QuadraticBackbone(nn.Module):
    """θ ∈ ℝ^d as the one parameter ``theta``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # not used by the objective
        return self.theta.expand(x.shape[0], -1)


class QuadraticHead(nn.Module):
    """Task t's centre c_t and curvatures h_t, frozen buffers."""

    def __init__(self, centre: torch.Tensor, curvature: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("c", centre.clone())
        self.register_buffer("h", curvature.clone())

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """½ Σ_j h_j (θ_j − c_j)² per row of ``theta``."""
        return 0.5 * (self.h * (theta - self.c) ** 2).sum(dim=-1)


class QuadraticModel(MultiTaskModel):
    """``MultiTaskModel`` whose objective is L_t (module docstring)."""

    def objective(
        self, task_index: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: (L_t(θ) + ⟨x_i, θ⟩, 1 / (1 + L_t(θ)/d))."""
        theta = self.backbone.theta
        loss = self.heads[task_index](theta)
        per_example = loss + x @ theta
        score = (1.0 / (1.0 + loss.detach() / theta.shape[0])).expand(x.shape[0])
        return per_example, score


def _check(key: str, value: float, ok: bool, need: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {need}, got {value!r}")


def check_quadratic(dim: object, spread: object, curvature_spread: object, noise: object) -> None:
    """One-line ConfigErrors, naming the run-config key, for bad knob values."""
    numbers = {"quadratic-spread": spread, "quadratic-curvature-spread": curvature_spread}
    numbers["quadratic-noise"] = noise
    whole = isinstance(dim, int) and not isinstance(dim, bool)
    _check("quadratic-dim", dim, whole and 1 <= dim <= MAX_DIM, f"an integer in 1..{MAX_DIM}")  # type: ignore[operator]
    for key, value in numbers.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(key, value, number and math.isfinite(value), "a finite number")  # type: ignore[arg-type]
    _check("quadratic-spread", spread, spread >= 0, "≥ 0 (0: one common minimiser)")  # type: ignore[operator]
    _check("quadratic-curvature-spread", curvature_spread, curvature_spread >= 1, "≥ 1 (1: h = 1)")  # type: ignore[operator]
    _check("quadratic-noise", noise, noise >= 0, "≥ 0 (0: exact gradients)")  # type: ignore[operator]


class QuadraticSuite(TaskSuite):
    """T quadratic tasks on one θ ∈ ℝ^d; see the module docstring."""

    name = "quadratic"

    def __init__(
        self,
        num_tasks: int = 8,
        dim: int = 50,
        spread: float = 1.0,
        curvature_spread: float = 4.0,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        check_quadratic(dim, spread, curvature_spread, noise)
        if num_tasks < 1:
            raise ConfigError(f"num-tasks must be ≥ 1, got {num_tasks}")
        self.dim, self.seed = int(dim), int(seed)
        self.spread, self.curvature_spread = float(spread), float(curvature_spread)
        self.noise = float(noise)
        g = torch.Generator().manual_seed(self.seed)
        centre = torch.randn(self.dim, generator=g)
        half_log = math.log(self.curvature_spread) / 2
        centres, curvatures = [], []
        for _ in range(num_tasks):
            centres.append(centre + self.spread * torch.randn(self.dim, generator=g))
            u = 2 * torch.rand(self.dim, generator=g) - 1
            curvatures.append(torch.exp(u * half_log))
        self.c, self.h = torch.stack(centres), torch.stack(curvatures)
        self._theta0: dict[int, torch.Tensor] = {self.seed: torch.randn(self.dim, generator=g)}
        exact = torch.zeros(1, self.dim)
        self.tasks = []
        for t in range(num_tasks):
            if self.noise > 0:
                xi = torch.randn(NOISE_EXAMPLES, self.dim, generator=g)
                train_x = self.noise * (xi - xi.mean(dim=0))
            else:
                train_x = exact
            splits: dict[str, torch.Tensor] = {}
            for split in SPLITS:
                x = train_x if split == "train" else exact
                splits[f"{split}_x"] = x
                splits[f"{split}_y"] = torch.zeros(x.shape[0], dtype=torch.long)
            self.tasks.append(TaskData(name=f"quad{t}", num_classes=1, **splits))

    def theta0(self, seed: int | None = None) -> torch.Tensor:
        """θ₀ of ``seed`` (None: the suite's): the suite's own vector, or one drawn from seed."""
        seed = self.seed if seed is None else int(seed)
        if seed not in self._theta0:
            g = torch.Generator().manual_seed(1_000_003 + seed)
            self._theta0[seed] = torch.randn(self.dim, generator=g)
        return self._theta0[seed]

    def build_model(self, seed: int | None = None) -> MultiTaskModel:
        backbone = QuadraticBackbone(self.dim)
        with torch.no_grad():
            backbone.theta.copy_(self.theta0(seed))
        heads = [QuadraticHead(c, h) for c, h in zip(self.c, self.h, strict=True)]
        return QuadraticModel(backbone, heads, [task.name for task in self.tasks])

    # -- the theory ------------------------------------------------------------------------------

    def minimiser(self, weights: Sequence[float]) -> torch.Tensor:
        """argmin Σ_t q_t L_t = Σ_t q_t h_t c_t / Σ_t q_t h_t (elementwise), float64."""
        q = torch.tensor(list(weights), dtype=torch.float64)[:, None]
        h, c = self.h.double(), self.c.double()
        return (q * h * c).sum(0) / (q * h).sum(0)

    def task_losses(self, theta: torch.Tensor) -> torch.Tensor:
        """[L_t(θ)] for every task, float64."""
        theta = theta.double()
        return 0.5 * (self.h.double() * (theta - self.c.double()) ** 2).sum(dim=1)

    def theory_metrics(
        self,
        state: Mapping[str, torch.Tensor],
        weights: Sequence[float],
        effective_weights: Sequence[float] | None = None,
    ) -> dict[str, object]:
        """At θ = ``state``: L_t, L = Σ p_t L_t, L(θ*_p), the gap, ‖θ − θ*_p‖ and, when the
        effective weights w_t are known (not before round 1), ‖θ − θ*_w‖ (float64)."""
        theta = state[FEDERATED_KEY].double()
        p = torch.tensor(list(weights), dtype=torch.float64)
        losses = self.task_losses(theta)
        opt_p = self.minimiser(weights)
        objective = float((p * losses).sum())
        optimum = float((p * self.task_losses(opt_p)).sum())
        metrics: dict[str, object] = {
            "task_losses": losses.tolist(),
            "objective": objective,
            "optimal_objective": optimum,
            "optimality_gap": objective - optimum,
            "distance_to_opt_p": float(torch.linalg.vector_norm(theta - opt_p)),
            "weights": p.tolist(),
            "effective_weights": None,
            "distance_to_opt_w": None,
        }
        if effective_weights is not None:
            opt_w = self.minimiser(effective_weights)
            metrics["effective_weights"] = [float(w) for w in effective_weights]
            metrics["distance_to_opt_w"] = float(torch.linalg.vector_norm(theta - opt_w))
        return metrics

    def problem_tensors(self, weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """What quadratic.safetensors holds: c [T, d], h [T, d], theta0 [d], p [T]."""
        return {
            "c": self.c.clone(),
            "h": self.h.clone(),
            "theta0": self.theta0().clone(),
            "p": torch.tensor(list(weights), dtype=torch.float32),
        }
