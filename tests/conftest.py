"""Fixtures shared by several test files (helpers that are not fixtures: tests/helpers.py).

None is autouse here: a module that wants one names it, e.g.
``pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")``, so a test file gets
exactly the fixtures it asks for (a test of ~/.cache or of many threads is not changed).
"""

from __future__ import annotations

import os

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

# Set before any test starts Flower: no venv per run (`uv sync` would pull CUDA torch), no
# telemetry. The engines' subprocesses inherit them.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (tiny tensors: threads only add barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_one_thread():
    """``one_thread`` for a whole module, its module-scoped fixtures included: opt in with
    ``pytestmark = pytest.mark.usefixtures("module_one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_cache(monkeypatch, tmp_path):
    """The update cache's default folder ($FL_SIM_CACHE) in this test's tmp_path."""
    monkeypatch.setenv("FL_SIM_CACHE", str(tmp_path / "fl-sim-cache"))


@pytest.fixture
def task_identity():
    """What run_simulation sets before a ServerApp builds Messages."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
