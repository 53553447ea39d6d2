"""The one code path that applies a rule to a model: tensor by tensor, chunk by chunk.

    Δ_t = θ_t − θ₀ (``inputs="models"``) or given (``inputs="updates"``),
    θ' = θ₀ + β · A(Δ₁..Δ_T)

A Flower round (θ₀ = θʳ, updates from the clients) and an offline ``fl-sim merge`` (θ₀ = the
base, fine-tuned models from disk) both run through ``aggregate_model``.

Speed: every float tensor is cut into chunks of ``chunk_size`` elements (a rule with
``whole_tensors`` gets each tensor as one chunk); for each chunk the clients' Δ_t are written into
one reused ``[T, chunk]`` buffer that stays in cache, the rule reduces it, and the result is
written once into a reused output buffer. Each input byte is read once per pass and nothing of
model size is allocated. Δ_t is computed in the tensor's compute dtype (float32, or float64 for a
float64 tensor; bfloat16/float16 inputs are widened before subtracting).

Linear rules (A = Σ_t c_t Δ_t, ``linear_coefficients``; also a multi-pass rule that is linear once
it has seen the earlier passes, cclip from v₀ = 0, on its last) take one path whether or not
statistics are asked for: θ' = θ₀ + Σ_t (β c_t) Δ_t, added client by client in client order, with
no [n] aggregate in between; the statistics (the Gram matrix of Δ) are a side pass over the same
Δ rows and change nothing in θ'. It is Δ-based rather than (1 − β Σ_t c_t) θ₀ + β Σ_t c_t θ_t on
the models because of this: a Flower round adds the clients' Δ_t = fl(θ_t − θ₀) as sent, and
``fl-sim merge`` from the checkpoints the run saves, θ₀ ⊕ Δ_t, recomputes (θ₀ ⊕ Δ_t) ⊖ θ₀, which is
Δ_t again bit for bit (exact whenever θ_t − θ₀ is, by Sterbenz's lemma, and so on 10⁸ random
float32 pairs of every magnitude otherwise), so with the same β c_t in the same order one-shot
FedAvg through Flower and the offline task_arithmetic merge give bit-identical models. The price,
from models: one more in-cache pass per client (Δ_t into a row, then added), ≈ 0.7× the speed of
the models form with ``--no-stats`` on a 2-core CPU; the same speed with statistics (the default).

On the CPU the engine runs on one thread: per 1 MiB chunk an op is too short to share, and with
the second core busy (a shared machine) every op waits for a descheduled thread at its barrier.
Measured on 2 cores: 10–30× slower with two threads under load, and one thread alone already
reads near the memory bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from fl_sim.errors import CheckpointError, ConfigError
from strategies.rule import Chunk, Rule

CPU_CHUNK = 1 << 18  # 1 MiB of float32: the [T, chunk] buffer stays in L2/L3
CUDA_CHUNK = 1 << 24
CPU_THREADS = 1  # see the module docstring

TensorGetter = Callable[[str], torch.Tensor]


@dataclass
class UpdateStatistics:
    """Σ over every merged coordinate of Δ_i·Δ_j (float64): norms and cosines of the updates."""

    gram: torch.Tensor
    coordinates: int = 0

    @classmethod
    def empty(cls, num_clients: int) -> UpdateStatistics:
        return cls(torch.zeros(num_clients, num_clients, dtype=torch.float64))

    def add(self, deltas: torch.Tensor) -> None:
        self.gram += (deltas @ deltas.T).to(device="cpu", dtype=torch.float64)
        self.coordinates += deltas.shape[1]

    def norms(self) -> list[float]:
        """‖Δ_t‖₂ over the whole federated parameter vector."""
        return self.gram.diagonal().clamp_min(0).sqrt().tolist()

    def cosines(self) -> list[list[float]]:
        """cos(Δ_i, Δ_j); 0 where an update is all zeros."""
        norms = self.gram.diagonal().clamp_min(0).sqrt()
        outer = torch.outer(norms, norms)
        cos = torch.where(outer > 0, self.gram / outer.clamp_min(1e-300), torch.zeros_like(outer))
        return cos.tolist()


@dataclass
class TensorPlan:
    """What the engine needs to know of one tensor before reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class AggregationOptions:
    server_lr: float = 1.0
    inputs: Literal["models", "updates"] = "models"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out_dtype: torch.dtype | None = None  # None: each tensor keeps its dtype
    chunk_size: int | None = None  # None: CPU_CHUNK on the CPU, CUDA_CHUNK on a GPU
    client_names: Sequence[str] | None = None  # for error messages ("checkpoint ft2.safetensors")
    base_name: str = "the base θ₀"


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU; ``cuda`` without one is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' asked for but torch sees no GPU (use --device cpu or auto)"
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@contextmanager
def intra_op_threads(device: torch.device) -> Iterator[None]:
    """Run the block on ``CPU_THREADS`` torch threads when aggregating on the CPU."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == CPU_THREADS:
        yield
        return
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def aggregate_model(
    rule: Rule,
    plans: Sequence[TensorPlan],
    base: TensorGetter,
    clients: Sequence[TensorGetter],
    options: AggregationOptions,
    *,
    statistics: UpdateStatistics | None = None,
    on_tensor_done: Callable[[TensorPlan, int], None] | None = None,
    on_chunk_done: Callable[[TensorPlan, Chunk, int], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, θ'[name])`` in ``plans`` order.

    The yielded tensor is a view of a reused buffer on the CPU, valid until the next item:
    write it out or ``clone()`` it. ``on_tensor_done(plan, pass_index)`` is called after each
    tensor of each pass (progress bars, releasing memory-mapped pages); ``on_chunk_done(plan,
    chunk, pass_index)`` after each chunk of each float tensor (a streaming server releases the
    spill files' pages chunk by chunk, so T inputs cost T chunks of memory, not T tensors).
    """
    with intra_op_threads(options.device):
        yield from _aggregate_model(
            rule, plans, base, clients, options, statistics, on_tensor_done, on_chunk_done
        )


def _aggregate_model(
    rule: Rule,
    plans: Sequence[TensorPlan],
    base: TensorGetter,
    clients: Sequence[TensorGetter],
    options: AggregationOptions,
    statistics: UpdateStatistics | None,
    on_tensor_done: Callable[[TensorPlan, int], None] | None,
    on_chunk_done: Callable[[TensorPlan, Chunk, int], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    num_clients = len(clients)
    device = options.device
    chunk_size = options.chunk_size or (CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK)
    floats = [p for p in plans if p.dtype.is_floating_point]
    largest = max((p.numel for p in plans), default=0)
    if rule.whole_tensors:  # one chunk per tensor: the buffer is [T, the largest float tensor]
        chunk_size = max((p.numel for p in floats), default=1)
    widest = torch.float64 if any(p.dtype == torch.float64 for p in floats) else torch.float32
    deltas_buffer = torch.empty(
        num_clients, min(chunk_size, max(largest, 1)), dtype=widest, device=device
    )
    beta = float(options.server_lr)
    names = list(options.client_names or [f"client {t}" for t in range(num_clients)])

    def chunks(plan: TensorPlan) -> Iterator[Chunk]:
        for start in range(0, plan.numel, chunk_size):
            yield Chunk(plan.name, start, min(start + chunk_size, plan.numel))

    def load(plan: TensorPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return base(plan.name).reshape(-1), [get(plan.name).reshape(-1) for get in clients]

    def fill_delta(row: torch.Tensor, x_chunk: torch.Tensor, base_chunk: torch.Tensor) -> None:
        """row = Δ_t on this chunk, computed in row's dtype for bfloat16/float16 inputs."""
        if options.inputs == "updates":
            row.copy_(x_chunk)
        elif x_chunk.dtype.itemsize < 4:  # torch.sub would round Δ to the inputs' dtype
            row.copy_(x_chunk).sub_(base_chunk)
        else:
            torch.sub(x_chunk, base_chunk, out=row)

    def fill_deltas(
        plan: TensorPlan, theta0: torch.Tensor, inputs: list[torch.Tensor], chunk: Chunk
    ) -> torch.Tensor:
        delta = deltas_buffer[:, : chunk.stop - chunk.start]
        base_chunk = theta0[chunk.start : chunk.stop].to(device, non_blocking=True)
        for t, x in enumerate(inputs):
            fill_delta(
                delta[t], x[chunk.start : chunk.stop].to(device, non_blocking=True), base_chunk
            )
        if not is_finite(delta):
            raise_non_finite(plan, chunk, [theta0, *inputs], [options.base_name, *names], beta)
        return delta

    for pass_index in range(rule.num_passes - 1):
        for plan in floats:
            theta0, inputs = load(plan)
            for chunk in chunks(plan):
                rule.observe(pass_index, chunk, fill_deltas(plan, theta0, inputs, chunk))
                if on_chunk_done:
                    on_chunk_done(plan, chunk, pass_index)
            if on_tensor_done:
                on_tensor_done(plan, pass_index)
        rule.end_pass(pass_index)

    # Asked only now: a multi-pass rule may become linear once it has seen the earlier passes.
    coefficients = rule.linear_coefficients()
    linear = coefficients is not None
    if linear:  # θ' = θ₀ + Σ_t (β c_t) Δ_t, one client at a time (module docstring)
        alphas = [beta * c_t for c_t in coefficients.tolist()]
    merged_buffer = torch.empty_like(deltas_buffer[0])
    out_buffers: dict[torch.dtype, torch.Tensor] = {}
    for plan in plans:
        keep_dtype = not plan.dtype.is_floating_point or options.out_dtype is None
        out_dtype = plan.dtype if keep_dtype else options.out_dtype
        if out_dtype not in out_buffers:
            out_buffers[out_dtype] = torch.empty(largest, dtype=out_dtype)
        out = out_buffers[out_dtype][: plan.numel]
        theta0, inputs = load(plan)
        if not plan.dtype.is_floating_point:
            check_equal_buffers(plan, theta0, inputs, names)
            out.copy_(theta0)
        # On the CPU θ' is computed straight into the output buffer when the dtypes agree.
        in_place = device.type == "cpu" and out.dtype == merged_buffer.dtype
        for chunk in chunks(plan) if plan.dtype.is_floating_point else ():
            target = out[chunk.start : chunk.stop]
            merged = target if in_place else merged_buffer[: chunk.stop - chunk.start]
            base_chunk = theta0[chunk.start : chunk.stop].to(device, non_blocking=True)
            if linear:
                # Δ_t into its row of the buffer (row 0 for every client when no statistics are
                # kept, so that one row stays hot; updates in the compute dtype are added as is)
                delta = deltas_buffer[:, : chunk.stop - chunk.start]
                if not inputs:
                    merged.copy_(base_chunk)
                for t, (alpha, x) in enumerate(zip(alphas, inputs, strict=True)):
                    x_chunk = x[chunk.start : chunk.stop].to(device, non_blocking=True)
                    if statistics is None and options.inputs == "updates":
                        row = x_chunk
                    else:
                        row = delta[t if statistics is not None else 0]
                        fill_delta(row, x_chunk, base_chunk)
                    if t == 0:  # θ₀ + α₀Δ₀ straight into θ', the same rounding as copy + add_
                        torch.add(base_chunk, row, alpha=alpha, out=merged)
                    else:
                        merged.add_(row, alpha=alpha)
                if statistics is not None:  # a side pass: θ' is the same with or without it
                    statistics.add(delta)
            else:
                delta = fill_deltas(plan, theta0, inputs, chunk)
                if statistics is not None:
                    statistics.add(delta)
                torch.add(base_chunk, rule.aggregate(chunk, delta), alpha=beta, out=merged)
            # A NaN/Inf in an input or in Δ reaches θ' (even at c_t = 0: 0·NaN is NaN).
            if not is_finite(merged):
                raise_non_finite(plan, chunk, [theta0, *inputs], [options.base_name, *names], beta)
            if not in_place:
                target.copy_(merged)
            if on_chunk_done:
                on_chunk_done(plan, chunk, rule.num_passes - 1)
        if on_tensor_done:
            on_tensor_done(plan, rule.num_passes - 1)
        yield plan.name, out.view(plan.shape)


def is_finite(values: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf.

    A sum in the values' own dtype is one cheap pass in cache (≈ 25× faster than summing in
    float64) and is finite whenever every element is; only when it is not, because of a NaN/Inf
    or because finite values overflowed the sum, are the elements checked one by one.
    """
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def raise_non_finite(
    plan: TensorPlan,
    chunk: Chunk,
    inputs: Sequence[torch.Tensor],
    names: Sequence[str],
    beta: float | None = None,
) -> None:
    """Name the first input that holds NaN/Inf on this chunk, or blame β when none does."""
    for name, x in zip(names, inputs, strict=True):
        bad = ~torch.isfinite(x[chunk.start : chunk.stop])
        if bad.any():
            index = chunk.start + int(bad.nonzero()[0, 0])
            raise CheckpointError(
                f"{name}: tensor {plan.name!r} holds NaN or Inf (flat index {index}); "
                "fix or drop that model"
            )
    raise ConfigError(
        f"the merged tensor {plan.name!r} overflowed to NaN/Inf with server_lr={beta} "
        "although every input is finite; use a smaller --server-lr/--lambda or a wider --dtype"
    )


def check_equal_buffers(
    plan: TensorPlan, theta0: torch.Tensor, inputs: Sequence[torch.Tensor], names: Sequence[str]
) -> None:
    """Integer/bool buffers (position ids, counters) are copied, so every client must agree."""
    for name, x in zip(names, inputs, strict=True):
        if not torch.equal(x, theta0):
            raise CheckpointError(
                f"{name}: non-float tensor {plan.name!r} ({plan.dtype}) differs from the base; "
                "integer buffers are copied, not merged, so they must be equal in every model"
            )
