"""Make the repository root importable when pytest runs without an installed fl-sim.

``pip install -e .`` (or ``pythonpath = ["."]`` under ``[tool.pytest.ini_options]``) makes this
unnecessary; until then a bare ``pytest`` would not find ``fl_sim`` and ``strategies``.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
