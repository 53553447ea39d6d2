#!/usr/bin/env bash
# A wheelhouse for an offline image build: every wheel the image needs, so that the Dockerfile
# installs with `pip install --no-index --find-links wheelhouse` and reaches no package index.
#
#   bash scripts/make_wheelhouse.sh [DIR]      # default DIR: wheelhouse/ (gitignored)
#   docker build -t fl-sim .                   # uses wheelhouse/ when it holds wheels
#
# Holds torch==2.13.0 (resolved first and alone, so that the CPU build is the one taken: set
# FL_SIM_TORCH_INDEX to PyTorch's CPU wheel index where plain `pip download torch==2.13.0` gives
# the CUDA build), the project's pinned dependencies, setuptools and wheel (the build backend of
# `pip install .` in the image), and the fl-sim wheel itself. The wheels are for this machine's
# Python and platform (CPython 3.11, linux x86_64 for the default base image): run it with the
# same Python version as the image's (PYTHON=python3.11). About 500 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-wheelhouse}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
"$python" -m pip --version >/dev/null || { echo "make_wheelhouse.sh: no pip for $python" >&2; exit 1; }

mkdir -p "$out"
torch_index=()
[ -n "${FL_SIM_TORCH_INDEX:-}" ] && torch_index=(--index-url "$FL_SIM_TORCH_INDEX")
"$python" -m pip download -q --only-binary=:all: -d "$out" "${torch_index[@]}" "torch==2.13.0"
# The project's dependencies (torch already there: pip reuses the wheel in $out).
"$python" -m pip download -q -d "$out" --find-links "$out" . setuptools wheel
# setuptools leaves build/ and fl_sim.egg-info/ in the tree: remove them only if we made them
made=()
for path in build fl_sim.egg-info; do [ -e "$path" ] || made+=("$path"); done
"$python" -m pip wheel -q --no-deps -w "$out" .
for path in "${made[@]}"; do rm -rf "$path"; done

torch_wheel="$(ls "$out"/torch-2.13.0*.whl 2>/dev/null | head -n 1)"
[ -n "$torch_wheel" ] || { echo "make_wheelhouse.sh: no torch 2.13.0 wheel in $out" >&2; exit 1; }
if ls "$out"/nvidia_* >/dev/null 2>&1; then
    echo "make_wheelhouse.sh: warning: CUDA wheels in $out (set FL_SIM_TORCH_INDEX to the CPU index)" >&2
fi
echo "make_wheelhouse.sh: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out ($(basename "$torch_wheel"))"
