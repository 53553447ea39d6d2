#!/usr/bin/env bash
# A local Docker base image with Python 3, made with debootstrap from Debian's package archive:
# for machines that cannot pull the Dockerfile's default base (python:3.11-slim) from an image
# registry but can reach a Debian archive (or a mirror of it).
#
#   bash scripts/make_base_image.sh [IMAGE]     # default IMAGE: fl-sim-base:bookworm
#   docker build --build-arg BASE_IMAGE=fl-sim-base:bookworm -t fl-sim .
#
# The archive is the one this machine's apt already uses: the first source of
# /etc/apt/sources.list.d/*.sources (deb822) or /etc/apt/sources.list (one-line) that serves the
# suite (default: this machine's Debian codename, FL_SIM_DEBIAN_SUITE to choose another); set
# FL_SIM_DEBIAN_MIRROR to use another archive. Needs root, debootstrap and a Docker engine.
# Takes about a minute and 300 MB; the root filesystem is made in a temporary folder and removed.
set -euo pipefail

image="${1:-fl-sim-base:bookworm}"
suite="${FL_SIM_DEBIAN_SUITE:-}"
if [ -z "$suite" ] && [ -r /etc/os-release ]; then
    suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
fi
suite="${suite:-bookworm}"

die() { echo "make_base_image.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd)"

# The archive URL of $suite in this machine's apt sources (deb822 first, then one-line lists).
archive_url() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -r "$file" ] || continue
        # stanzas are separated by blank lines; print URIs of a stanza whose Suites hold $suite
        awk -v suite="$suite" '
            function flush() {
                if (uris != "" && (" " suites " ") ~ (" " suite " ") && types ~ /(^| )deb( |$)/)
                    { split(uris, u, " "); print u[1]; found = 1; exit }
                uris = ""; suites = ""; types = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
            END { if (!found) flush() }
        ' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$file" ] || continue
        # deb [options] URL SUITE COMPONENTS...
        awk -v suite="$suite" '
            $1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }
        ' "$file"
    done
}

mirror="${FL_SIM_DEBIAN_MIRROR:-$(archive_url | head -n 1)}"
[ -n "$mirror" ] || die "no apt source serves suite '$suite' (set FL_SIM_DEBIAN_MIRROR)"

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
echo "make_base_image.sh: debootstrap $suite from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' \
    - "$image" >/dev/null
docker run --rm "$image" python3 -c 'import sys, venv; print("python", sys.version.split()[0])'
echo "make_base_image.sh: $image (build with --build-arg BASE_IMAGE=$image)"
