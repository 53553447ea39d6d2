#!/usr/bin/env bash
# SuperNode authentication keys: one ECDSA P-384 key pair (OpenSSH format) per SuperNode.
#
#   bash scripts/make_node_keys.sh [OUT_DIR] [N]      # default: keys/ (gitignored), N = 8
#
# Writes OUT_DIR/supernode-t (private: `flower-supernode --auth-supernode-private-key`) and
# OUT_DIR/supernode-t.pub (public: enrol it with `flwr supernode register OUT_DIR/supernode-t.pub
# FEDERATION` through the SuperLink's Control API) for t = 0..N-1. Existing pairs are kept, so a
# node keeps its identity (and its node id) across runs; delete a pair to make a new one.
# ssh-keygen where installed, else Python's `cryptography` (a dependency of flwr).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-keys}"
count="${2:-8}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

mkdir -p "$out"
for ((t = 0; t < count; t++)); do
    key="$out/supernode-$t"
    [ -s "$key" ] && [ -s "$key.pub" ] && continue
    rm -f "$key" "$key.pub"
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fl-sim supernode-$t" -f "$key"
    else
        "$python" - "$key" "$t" <<'PY'
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, t = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.OpenSSH,
    serialization.NoEncryption(),
)
public = key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(private)
with open(path + ".pub", "wb") as f:
    f.write(public + f" fl-sim supernode-{t}\n".encode())
PY
    fi
done
# The SuperNode containers run as uid 1000, not as this file's owner: they must read the key
# (as make_certs.sh does for the server key). The folder can be entered but not listed.
chmod 711 "$out"
chmod 644 "$out"/supernode-*
echo "make_node_keys.sh: $count key pairs in $out/ (register each .pub with flwr supernode register)"
