#!/usr/bin/env bash
# Run llmrun's Arm (KleidiAI) kernel tests on an x86-64 Linux host, under qemu user-mode
# emulation of an aarch64 CPU (-cpu max: dotprod, i8mm, SVE).
#
#   scripts/test-aarch64.sh                 # tests/test_kernels_arm.py
#   scripts/test-aarch64.sh -k layout -x    # extra arguments go to pytest
#   scripts/test-aarch64.sh --clean         # delete the cache first (cold run)
#
# It builds, once, under a cache outside the repo ($LLMRUN_AARCH64_CACHE, default
# ~/.cache/llmrun-aarch64):
#   root/  a Debian bookworm arm64 file tree (debootstrap --foreign, then every downloaded
#          .deb unpacked with dpkg -x: nothing is configured, nothing runs in a chroot), which
#          gives the loader, libc and python3.11;
#   site/  the aarch64 CPU wheel of torch 2.7.1 (KleidiAI built in), numpy and pytest,
#          unzipped (scripts/aarch64/requirements.txt pins them), put on PYTHONPATH.
# Needs root (debootstrap; apt-get installs qemu-user-static and debootstrap when missing)
# and network access to the Debian mirror and PyPI on the first run only. See docs/aarch64.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LLMRUN_AARCH64_CACHE:-$HOME/.cache/llmrun-aarch64}"
SUITE="${LLMRUN_AARCH64_SUITE:-bookworm}"   # bookworm ships python3.11, matching the wheels
MIRROR="${LLMRUN_AARCH64_MIRROR:-http://deb.debian.org/debian}"
REQS="$REPO/scripts/aarch64/requirements.txt"
ROOT="$CACHE/root-$SUITE"
SITE="$CACHE/site-$(sha256sum "$REQS" | cut -c1-12)"

log() { printf '[test-aarch64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ "${1:-}" == "--clean" ]]; then
    shift
    log "removing $CACHE"
    rm -rf "$CACHE"
fi

[[ "$(uname -m)" == "x86_64" ]] || log "note: host is $(uname -m), not x86_64; emulating anyway"

# --- host tools -------------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "need qemu-aarch64-static and debootstrap: apt-get install qemu-user-static debootstrap (as root)"
    log "installing qemu-user-static and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap >/dev/null
fi
QEMU="$(command -v qemu-aarch64-static)"
PY="${PYTHON:-python3}"   # host python, for pip download and unzipping wheels
command -v "$PY" >/dev/null || die "need a host python3 with pip"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one build at a time per cache

# --- arm64 root ---------------------------------------------------------------------------
if [[ ! -e "$ROOT/.llmrun-ready" ]]; then
    [[ $(id -u) -eq 0 ]] || die "building the arm64 root needs root (debootstrap)"
    log "building the arm64 $SUITE root in $ROOT"
    tmp="$ROOT.tmp"
    rm -rf "$tmp" "$ROOT"
    # --foreign: download and unpack the required set only (no second stage, which would
    # need binfmt_misc). --include=python3.11 downloads python and its libraries too.
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11 \
        "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed, see $CACHE/debootstrap.log"
    # Unpack every downloaded package (python3.11 and its libraries were only downloaded).
    for deb in "$tmp"/var/cache/apt/archives/*.deb; do
        dpkg -x "$deb" "$tmp"
    done
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    [[ -x "$tmp/usr/bin/python3.11" ]] || die "python3.11 missing from the arm64 root"
    touch "$tmp/.llmrun-ready"
    mv "$tmp" "$ROOT"
fi

# --- aarch64 wheels -----------------------------------------------------------------------
if [[ ! -e "$SITE/.llmrun-ready" ]]; then
    log "downloading aarch64 wheels ($(grep -c '^[a-z]' "$REQS") pinned) into $CACHE/wheels"
    mkdir -p "$CACHE/wheels"
    "$PY" -m pip download -qq --no-deps --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
        -r "$REQS" -d "$CACHE/wheels"
    log "unpacking wheels into $SITE"
    tmp="$SITE.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    while read -r req; do
        [[ "$req" =~ ^[A-Za-z] ]] || continue
        name="${req%%==*}"; version="${req#*==}"
        # wheel file names use the normalized name: lower case, '-' -> '_'
        norm="$(printf '%s' "$name" | tr 'A-Z-' 'a-z_')"
        whl="$(find "$CACHE/wheels" -maxdepth 1 -iname "${norm}-${version}-*.whl" | head -n1)"
        [[ -n "$whl" ]] || die "no wheel for $req in $CACHE/wheels"
        "$PY" -m zipfile -e "$whl" "$tmp"
    done <"$REQS"
    touch "$tmp/.llmrun-ready"
    rm -rf "$SITE"
    mv "$tmp" "$SITE"
    # older site-* folders belong to older pins
    find "$CACHE" -maxdepth 1 -name 'site-*' ! -path "$SITE" -exec rm -rf {} +
fi

# --- run ----------------------------------------------------------------------------------
# Test the Arm kernels unless a test path is given: the rest of the suite needs packages
# that this root does not have.
has_path=0
for arg in "$@"; do
    [[ -e "$REPO/${arg%%::*}" ]] && has_path=1
done
[[ $has_path -eq 1 ]] || set -- tests/test_kernels_arm.py "$@"
log "running pytest $* under qemu-aarch64 -cpu max"
cd "$REPO"
# PYTHONPATH: the repo (llmrun itself, not installed) and the unzipped wheels; nothing of the
# host's site-packages. Bytecode goes to the cache, never into the repo.
env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8 \
    PYTHONPATH="$REPO:$SITE" PYTHONNOUSERSITE=1 PYTHONPYCACHEPREFIX="$CACHE/pycache" \
    LLMRUN_REQUIRE_KLEIDIAI="${LLMRUN_REQUIRE_KLEIDIAI:-1}" \
    "$QEMU" -cpu max -L "$ROOT" "$ROOT/usr/bin/python3.11" \
    scripts/aarch64/run_tests.py -p no:cacheprovider -ra "$@"
