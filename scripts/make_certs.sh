#!/usr/bin/env bash
# TLS for the deployment engine: a self-signed CA and a SuperLink server certificate signed by it.
#
#   bash scripts/make_certs.sh [OUT_DIR]        # default: certs/ (gitignored)
#
# Writes OUT_DIR/ca.crt (give it to SuperNodes, SuperExecs and `flwr` as root certificates),
# OUT_DIR/server.pem and OUT_DIR/server.key (the SuperLink's --ssl-certfile / --ssl-keyfile).
# The server certificate is valid for the names a client dials: superlink (the compose service),
# localhost and 127.0.0.1 (loopback, and the SuperExec a SuperLink starts itself). Extra names:
#   FL_SIM_CERT_SANS="DNS:flower.example.org,IP:10.0.0.5" bash scripts/make_certs.sh
set -euo pipefail

out="${1:-certs}"
days="${FL_SIM_CERT_DAYS:-365}"
sans="DNS:superlink,DNS:localhost,IP:127.0.0.1${FL_SIM_CERT_SANS:+,$FL_SIM_CERT_SANS}"
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }

mkdir -p "$out"
umask 077  # private keys readable by their owner only
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" \
    -subj "/O=fl-sim/CN=fl-sim CA" -out "$out/ca.crt"
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/O=fl-sim/CN=superlink" -out "$out/server.csr"
extensions="$(mktemp)"
trap 'rm -f "$extensions"' EXIT
printf '%s\n' \
    "basicConstraints = CA:FALSE" \
    "keyUsage = digitalSignature, keyEncipherment" \
    "extendedKeyUsage = serverAuth" \
    "subjectAltName = $sans" >"$extensions"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$extensions" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
# Containers run as root here, but a non-root image user must still read the key:
chmod 644 "$out/server.key"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "make_certs.sh: $out/ca.crt, $out/server.pem, $out/server.key (SAN $sans)"
