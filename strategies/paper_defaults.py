"""The paper's authors' choices where fl-sim's defaults differ, selected by one switch.

``paper-defaults = true`` (run config) or ``fl-sim merge --paper-defaults`` (YAML
``parameters: {paper_defaults: true}``) sets each choice below that was not given explicitly;
an explicit key, flag or YAML parameter always wins, even when it spells fl-sim's default.

What the authors' code does (github.com/SilviaTao/one_shot_fl_task_arithmetic at commit
``339d8af``, ``src/ta_algorithms.py``):

- ``fednova`` (lines 25-27): ``(np.mean(local_steps) / np.array(local_steps)) / len(tvs)``
  weights each task vector: ‖a_t‖₁ = K_t, the number of local steps (``a-norm = steps``;
  fl-sim's default ``lr-sum`` counts Σ_k η_t⁽ᵏ⁾).
- ``median_of_tvs`` (lines 14-22): ``torch.median(..., dim=0)``, the lower of the two middle
  values for even T (``median-mode = lower``; fl-sim's default ``mean`` is NumPy's and Flower's).

Already fl-sim's defaults, so the switch changes nothing there: CCLIP (lines 55-65) clips each
τ_t once around v₀ = 0 with the norm over the whole task vector (``TaskVector.norm`` in
``src/task_vectors.py``, lines 63-68), i.e. L = 1 (``cclip-iters = 1``); FedGMA's mask
(lines 30-52) is M = 1 where S ≥ ρ, else S; uniform client weights; integer buffers are not
merged (``src/task_vectors.py`` lines 21-22). Choices the authors make by a search, which no
single default can stand for: ρ of FedGMA over ``np.arange(0.1, 1.0, 0.1)`` (line 69) and τ_c
of CCLIP over ``np.linspace(min ‖τ_t‖, max ‖τ_t‖, n, endpoint=False)`` (line 114), each jointly
with λ.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperChoice:
    """One choice: its run-config key, its ``fl-sim merge`` YAML name (the flag is the key),
    the rule whose knob it is (None: every rule's, e.g. a-norm), the value, and where the
    authors' code makes it."""

    key: str
    yaml: str
    rule: str | None
    value: str
    source: str


PAPER_CHOICES: tuple[PaperChoice, ...] = (
    PaperChoice(
        "a-norm",
        "a_norm",
        None,
        "steps",
        "src/ta_algorithms.py:25-27 (fednova: mean(K)/K_t, ‖a_t‖₁ = K_t)",
    ),
    PaperChoice(
        "median-mode",
        "median_mode",
        "median",
        "lower",
        "src/ta_algorithms.py:14-22 (torch.median: the lower middle value for even T)",
    ),
)


def paper_values(given: Collection[str], *, by: str = "key") -> dict[str, str]:
    """The paper's value of every choice whose name (``by`` = ``key`` or ``yaml``) is not in
    ``given``: what the switch sets."""
    return {getattr(c, by): c.value for c in PAPER_CHOICES if getattr(c, by) not in set(given)}


__all__ = ["PAPER_CHOICES", "PaperChoice", "paper_values"]
