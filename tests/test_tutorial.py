"""docs/tutorial.ipynb executes, and shows the paper's three claims with the numbers it states.

The notebook is run with nbclient on a copy in tmp_path (the committed file, with its rendered
outputs, is never rewritten by the tests), in a kernel of this interpreter: a kernel spec whose
argv is ``sys.executable`` is written into a temporary folder on JUPYTER_PATH, so nothing is
registered globally and the venv's own torch and fl-sim are what the notebook imports.

``python tests/test_tutorial.py`` re-executes the notebook in place and saves its outputs (the
rendered copy that the repository carries); run it after changing the notebook.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
KERNEL = "fl-sim-tutorial"
CELL_TIMEOUT = 120  # seconds per cell
MAX_BYTES = 1_500_000  # the rendered notebook stays small (PNG plots at 80 dpi)


def execute(notebook_path: Path, kernel_dir: Path) -> tuple[object, float]:
    """Run every cell of ``notebook_path`` in a kernel of sys.executable; the executed
    notebook and the wall time. Raises nbclient's CellExecutionError on a failing cell."""
    kernelspec.install(kernel_name=KERNEL, prefix=str(kernel_dir))  # argv: sys.executable
    env = {
        "JUPYTER_PATH": str(kernel_dir / "share" / "jupyter"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        notebook = nbformat.read(notebook_path, as_version=4)
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)  # an earlier run's timestamps
        client = nbclient.NotebookClient(
            notebook,
            timeout=CELL_TIMEOUT,
            kernel_name=KERNEL,
            record_timing=False,  # no timestamps in the saved notebook
            resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory
        )
        start = time.perf_counter()
        client.execute()
        return notebook, time.perf_counter() - start
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def outputs_text(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )


def summary_of(notebook) -> dict:
    """The JSON the notebook's last cell prints after ``SUMMARY``."""
    lines = [line for line in outputs_text(notebook).splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, "the notebook prints one SUMMARY line"
    return json.loads(lines[0].removeprefix("SUMMARY "))


def check_claims(summary: dict) -> None:
    """The numbers the notebook's text states (docs/design.md, the quadratic suite)."""
    identity = summary["identity"]
    assert identity["rule_diff"] == 0.0  # task_arithmetic(λ) is fedavg(β = λT), bit for bit
    assert identity["hand_diff"] < 1e-6 and identity["loop_diff"] < 1e-6
    assert identity["acc_best"] > identity["acc_theta0"]

    h = summary["heterogeneity"]
    assert summary["chi2"] == pytest.approx(0.5288, abs=1e-4)
    small_avg, small_nova = h["small steps/fedavg"], h["small steps/fednova"]
    assert small_nova["opt_p"] < 0.1 < 1.0 < small_avg["opt_p"]  # FedNova → θ*_p
    assert small_avg["opt_w"] < 0.1 < 1.0 < small_nova["opt_w"]  # FedAvg → θ*_w
    assert small_nova["opt_p"] < small_avg["opt_p"]
    sat_avg, sat_nova = h["saturated/fedavg"], h["saturated/fednova"]
    assert sat_nova["opt_p"] > sat_avg["opt_p"] + 0.1  # FedNova over-corrects
    assert sat_nova["gap"] > sat_avg["gap"]

    data = summary["data"]
    gaps = {int(R): g for R, g in data["gaps"].items()}
    assert max(g[0] for g in gaps.values()) < 1e-6  # s_c = 0: every client agrees
    assert gaps[1][-1] > 5 * gaps[20][-1] and data["ratio"] > 5
    for g in gaps.values():
        assert g == sorted(g)


def test_the_tutorial_notebook_runs_and_shows_the_three_claims(tmp_path):
    copy = tmp_path / "tutorial.ipynb"
    copy.write_bytes(NOTEBOOK.read_bytes())
    notebook, seconds = execute(copy, tmp_path / "kernel")  # raises on a failing cell
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 3, "one plot per claim"
    summary = summary_of(notebook)
    check_claims(summary)
    assert summary["seconds"] < 120 and seconds < 180


def test_the_committed_notebook_carries_its_rendered_outputs():
    """The file in the repository shows its plots and numbers when viewed, and stays small."""
    assert NOTEBOOK.stat().st_size < MAX_BYTES
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    pngs = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert pngs == 3
    check_claims(summary_of(notebook))


if __name__ == "__main__":  # re-render docs/tutorial.ipynb in place
    with tempfile.TemporaryDirectory() as folder:
        executed, wall = execute(NOTEBOOK, Path(folder))
    nbformat.write(executed, NOTEBOOK)
    print(f"executed {NOTEBOOK.relative_to(ROOT)} in {wall:.1f} s; {NOTEBOOK.stat().st_size} bytes")
    sys.exit(0)
