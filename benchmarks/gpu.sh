#!/usr/bin/env bash
# The GPU check of curvlab in one go (about 7 minutes on one GPU; cap: GPU_BUDGET_S, default 470 s).
#
#   bash benchmarks/gpu.sh            # from anywhere; runs in the repository root
#
# 0. setup, with no package registry needed: the first of .venv/bin/python, python3 and python
#    that imports torch; fails at once with "no CUDA device: nothing to run" without a GPU. When
#    .whl/*.whl exist (benchmarks/gpu_wheels.sh downloads them where pip works: backpack-for-pytorch,
#    unfoldNd, hessian-eigenthings), installs them with `pip install --no-index --no-deps
#    --target $GPU_SITE` (default /tmp/site); runs everything with PYTHONPATH=$GPU_SITE:<repository
#    root> (no editable install). Then torch, backpack, scipy, scikit-learn, pytest and curvlab must
#    import, or it stops, naming what is missing and saying to run gpu_wheels.sh and carry .whl.
#    hessian-eigenthings is optional: without it the comparison rows are skipped.
# 1. the CUDA tests: the files of tests/ that mention cuda, `-k "cuda or gpu or device"`.
# 2. the benchmarks with --device cuda, float32 and under bf16 autocast, with reduced rounds:
#    bench_any_model, bench_quantities, bench_noise, bench_hooks (eager, and --compile with
#    torch.compile's default inductor backend).
# 3. one summary table of the key ratios against their targets (the scripts' `SUMMARY |` lines)
#    and of each part's exit status and time.
#
# Expected time per part on one H200 (estimates, not yet measured; the cap per part in brackets; a global deadline of
# GPU_BUDGET_S seconds shortens the last parts, or skips them, rather than overrunning):
#   setup ~10 s | tests ~40 s [90] | bench_any_model fp32 ~60 s [100], bf16 ~25 s [60] |
#   bench_quantities fp32 ~40 s [80], bf16 ~45 s [80] | bench_noise fp32 ~20 s [60], bf16 ~20 s [60] |
#   bench_hooks eager fp32 ~20 s [60], compiled fp32 ~80 s [150] (inductor compilation in the
#   warm-up), compiled bf16 ~60 s [120]                                        total ~420 s
#
# Everything is tee'd into one log: $GPU_LOG, else $OUT/curvlab-gpu.log when $OUT is set, else
# /tmp/curvlab-gpu-<time>.log. Exit status: 0 when every part ran (a missed target is a
# measurement, not a failure), 1 when a part failed or timed out, 2 without a CUDA device.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$SECONDS
DEADLINE=$((START + ${GPU_BUDGET_S:-470}))
if [[ -n "${GPU_LOG:-}" ]]; then
    LOG=$GPU_LOG
elif [[ -n "${OUT:-}" ]]; then
    LOG=$OUT/curvlab-gpu.log
else
    LOG=/tmp/curvlab-gpu-$(date +%Y%m%d-%H%M%S).log
fi
mkdir -p "$(dirname "$LOG")"
: >"$LOG"
export PYTHONUNBUFFERED=1

say() { echo "$@" | tee -a "$LOG"; }

# ---------------------------------------------------------------- 0. setup
PY=""
for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" 2>/dev/null; then
        PY=$(command -v "$c")
        break
    fi
done
if [[ -z $PY ]]; then
    say "no Python that imports torch (tried .venv/bin/python, python3, python)"
    exit 1
fi
say "== curvlab GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), python: $PY, log: $LOG"

has_cuda() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
no_cuda() {
    say "no CUDA device: nothing to run"
    exit 2
}
has_cuda || no_cuda # before installing anything

# the carried wheels: into a target folder of their own, on PYTHONPATH with the repository root
SITE=${GPU_SITE:-/tmp/site}
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]} > 0)); then
    say "== installing ${#WHEELS[@]} carried wheel(s) into $SITE: ${WHEELS[*]#.whl/}"
    rc=0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${WHEELS[@]}" 2>&1 | tee -a "$LOG" || rc=$?
    if ((rc != 0)); then
        say "installing the wheels of .whl failed (two versions of one package? see above)"
        exit 1
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
MISSING=$(
    "$PY" - 2>/dev/null <<'EOF'
import importlib

missing = []
for name in ["torch", "backpack", "unfoldNd", "scipy", "sklearn", "pytest", "curvlab"]:
    try:
        importlib.import_module(name)
    except Exception as e:  # an import error of any kind names the package
        missing.append(f"{name} ({type(e).__name__}: {e})")
print("; ".join(missing))
EOF
) || MISSING="the import check itself failed"
if [[ -n $MISSING ]]; then
    say "missing: $MISSING"
    if ((${#WHEELS[@]} == 0)); then
        say "no .whl/*.whl here: where pip reaches PyPI, run 'bash benchmarks/gpu_wheels.sh', carry"
        say ".whl to this machine (the device tool: carry [\".whl\"]) and run gpu.sh again; on a"
        say "machine with a package registry, 'pip install -e \".[test]\"' also does"
    else
        say "the carried wheels do not cover it: see benchmarks/gpu_wheels.sh"
    fi
    exit 1
fi
"$PY" -c "import hessian_eigenthings" 2>/dev/null ||
    say "== hessian-eigenthings not importable: its comparison rows are skipped"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
p = torch.cuda.get_device_properties(0)
print(f"== torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s); "
      f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB")
EOF

# ---------------------------------------------------------------- parts
FAILED=0

# part NAME LIMIT_S CMD...: runs CMD under `timeout`, capped by the global deadline, tee'd into the
# log; records "PART | name | status | seconds" in the log for the summary.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        say "PART | $name | skipped: out of time (GPU_BUDGET_S) | 0"
        FAILED=1
        return 0
    fi
    if ((limit > left)); then limit=$left; fi
    say ""
    say "== $name (limit ${limit} s): $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
    local took=$((SECONDS - t0)) status
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    if [[ $name == tests && $rc == 5 ]]; then
        status="no CUDA test selected (pytest exit 5)"
        rc=0
    fi
    if ((rc != 0)); then FAILED=1; fi
    say "PART | $name | $status | $took"
    return 0
}

# 1. the CUDA tests: files of tests/ that mention cuda (their CUDA tests are skipped on the CPU)
mapfile -t CUDA_TESTS < <(grep -l -i "cuda" tests/test_*.py | sort)
if ((${#CUDA_TESTS[@]} == 0)); then
    say "PART | tests | no test file mentions cuda | 0"
else
    part tests 90 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -rs \
        -k "cuda or gpu or device" "${CUDA_TESTS[@]}"
fi

# 2. the benchmarks on the GPU, float32 then bf16 autocast
B=benchmarks
part "bench_any_model fp32" 100 "$PY" $B/bench_any_model.py --device cuda --rounds 10
part "bench_any_model bf16" 60 "$PY" $B/bench_any_model.py --device cuda --rounds 10 --autocast bf16
part "bench_quantities fp32" 80 "$PY" $B/bench_quantities.py --device cuda --repeats 50 --budget 1
part "bench_quantities bf16" 80 "$PY" $B/bench_quantities.py --device cuda --repeats 50 --budget 1 \
    --autocast bf16
part "bench_noise fp32" 60 "$PY" $B/bench_noise.py --device cuda --rounds 30
part "bench_noise bf16" 60 "$PY" $B/bench_noise.py --device cuda --rounds 30 --autocast bf16
part "bench_hooks eager fp32" 60 "$PY" $B/bench_hooks.py --device cuda --steps 200 --repeats 3
part "bench_hooks compiled fp32" 150 "$PY" $B/bench_hooks.py --device cuda --steps 200 --repeats 3 \
    --compile
part "bench_hooks compiled bf16" 120 "$PY" $B/bench_hooks.py --device cuda --steps 200 --repeats 3 \
    --compile --autocast bf16

# W5 (GPT-2 small) at its GPU shape, 8 x 1024 tokens, each call in its own process: only on request
# (CURVLAB_GPU_SCALE=1, with GPU_BUDGET_S raised by about 300 s), as it does not fit the default
# budget beside the parts above
if [[ ${CURVLAB_GPU_SCALE:-0} == 1 ]]; then
    part "bench_scale W5 8x1024" 300 "$PY" $B/bench_scale.py --device cuda
fi

# ---------------------------------------------------------------- 3. the summary
say ""
"$PY" - "$LOG" "$((SECONDS - START))" <<'EOF' | tee -a "$LOG.summary"
import sys

log, total = sys.argv[1], sys.argv[2]
rows, parts = [], []
for line in open(log, encoding="utf-8", errors="replace"):
    cells = [c.strip() for c in line.rstrip("\n").split("|")]
    if cells[0] == "SUMMARY" and len(cells) == 6:
        rows.append(cells[1:])
    elif cells[0] == "PART" and len(cells) == 4:
        parts.append(cells[1:])


def table(header, body):
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i in (2, 3) and len(header) == 5 else '<'}{w}}}"
                    for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print(fmt.format(*r))


print(f"==== curvlab GPU check: summary ({total} s in all; log {log})")
print()
if rows:
    table(["script", "what", "value", "target", "verdict"], rows)
else:
    print("no SUMMARY line in the log")
missed = sum(r[4] == "MISSED" for r in rows)
print()
table(["part", "status", "seconds"], parts)
print()
print(f"targets: {sum(r[4] == 'ok' for r in rows)} met, {missed} missed; "
      f"parts: {sum(p[1] == 'ok' for p in parts)} of {len(parts)} ran through")
EOF
cat "$LOG.summary" >>"$LOG" && rm -f "$LOG.summary"
exit "$FAILED"
