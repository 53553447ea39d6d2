#!/usr/bin/env bash
# The GPU path in one command: what a machine with a CUDA device must show.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default gpu-check/; PYTHON=... picks the interpreter)
#
# 1. the device: torch's CUDA build, the GPU's name and its measured device-to-device copy
#    bandwidth (GB/s, bytes read + written), the yardstick for the merge rows;
# 2. the CUDA tests (rules, TIES/DARE and merge on the device give the CPU's result);
# 3. benchmarks/bench_merge.py --device cpu,cuda on the base-size checkpoints (GB/s per rule);
# 4. a short federation (toy suite, T = 3, 2 rounds of fedavg and one-shot median) with
#    server-device = cuda and client-num-gpus = 0.5, whose weights must equal the same run with
#    server-device = cpu and client-num-gpus = 0.
#
# Every step writes its log (and bench_merge.json, federation.json) under OUT_DIR and the script
# ends with a summary line per step. Without a CUDA device it says so and exits 3 after step 1,
# so it can be tried on a CPU machine. Steps 2 and 4 need flwr[simulation] (Flower + Ray) next to
# torch: install the project first (scripts/bootstrap.sh does, with the CPU torch; on a GPU
# machine install the CUDA torch it has, then `pip install -e ".[dev]"`).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT_DIR="${1:-gpu-check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
summary=()

"$PY" - "$OUT_DIR/device.json" <<'PY' 2>&1 | tee "$OUT_DIR/device.log"
import json
import sys
import time

import torch

info = {"torch": torch.__version__, "cuda_build": torch.version.cuda}
info["cuda_available"] = torch.cuda.is_available()
if info["cuda_available"]:
    info["device"] = torch.cuda.get_device_name(0)
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    info["copy_gb_per_s"] = round(2 * x.numel() / seconds / 1e9, 1)  # read + write
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
print(json.dumps(info))
PY
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing more to check"
  exit 3
fi
summary+=("device: $(cat "$OUT_DIR/device.json" | tr -d '\n ')")

"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_rules.py tests/test_ties_dare.py \
  tests/test_merge_cli.py -k "cuda or device" 2>&1 | tee "$OUT_DIR/cuda_tests.log"
summary+=("cuda tests: $(tail -n 1 "$OUT_DIR/cuda_tests.log")")

"$PY" benchmarks/bench_merge.py --sizes base --clients 8 --device cpu,cuda --skip mergekit \
  --no-progress --json "$OUT_DIR/bench_merge.json" 2>&1 | tee "$OUT_DIR/bench_merge.log"
summary+=("bench_merge: exit ${PIPESTATUS[0]}, figures in $OUT_DIR/bench_merge.json")

"$PY" - "$OUT_DIR" <<'PY' 2>&1 | tee "$OUT_DIR/federation.log"
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fl_sim.config.run_config import RunConfig
from fl_sim.federation.simulation import simulate

out = Path(sys.argv[1]).resolve()
common = {"experiment": "single", "task-suite": "toy", "optimizer": "sgd", "lr": 0.05,
          "num-tasks": 3, "local-steps": 8, "update-cache": False}
report = {}
for rule, rounds in (("fedavg", 2), ("median", 1)):
    weights = {}
    for device, gpus in (("cpu", 0.0), ("cuda", 0.5)):
        folder = out / f"federation-{rule}-{device}"
        values = {**common, "strategy": rule, "num-rounds": rounds, "server-device": device,
                  "client-num-gpus": gpus, "results-dir": str(folder)}
        (results,) = simulate([RunConfig.from_mapping(values)], progress=False)
        assert results["status"] == "completed", results.get("error")
        weights[device] = load_file(folder / "global_model.safetensors")
    diff = max(float((weights["cuda"][n] - weights["cpu"][n]).abs().max()) for n in weights["cpu"])
    for name, expected in weights["cpu"].items():
        torch.testing.assert_close(weights["cuda"][name], expected, rtol=1e-5, atol=1e-6)
    report[rule] = {"rounds": rounds, "max_abs_difference": diff}
    print(f"{rule}: server-device=cuda + client-num-gpus=0.5 equals cpu (max |Δ| = {diff:.3g})")
(out / "federation.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
PY
summary+=("federation: exit ${PIPESTATUS[0]}, $(tail -n 1 "$OUT_DIR/federation.log")")

printf '%s\n' "${summary[@]}" | tee "$OUT_DIR/summary.txt"
