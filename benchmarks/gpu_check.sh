#!/usr/bin/env bash
# The GPU checks of the performance work, in one go and under 5 minutes on one H100:
#   1. the equivalence tests (ours against HF and timm) on the GPU,
#   2. the benchmark at GPU sizes: ours against HF in fp32 and bf16 autocast, the cost curve, the loader,
#   3. the compiled mode (every block compiled, ours and HF's) in bf16: each side's first compile on an
#      empty Inductor cache and on the filled one, and the compiled step beside the eager one,
#   4. sharded training on the device (benchmarks/sharded_check.py): FSDP2's bf16 policy in a 1-rank
#      process group and a bf16 run with sharded checkpoints, resumed and consolidated (the 2-rank
#      FSDP2 and world-size changes are tests/test_sharded.py's, on the CPU with gloo),
#   5. the memory planner against the allocator's measured peaks of single-GPU training steps.
# It prints everything and writes docs/gpu_check_<date>.md (the benchmark's JSON beside it). It needs
# what a machine with torch, transformers and timm has (pytest for step 1; scipy, which simmim's zoo
# imports; scikit-image for the loader's photographs, else that part is skipped); simmim runs from src/.
#
#   bash benchmarks/gpu_check.sh             # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on the CPU at test size; report in a temp dir
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DATE=$(date +%Y-%m-%d)
if [ "${1:-}" = "--dry-run" ]; then
    DEVICE=cpu OUT=$(mktemp -d)
    QUICK=(--model simmim_swin-nano_test-64px --img-size 128 --batch 2 --repeats 1)
    TESTS=(-k "192-w6 and simmim")  # one HF comparison is enough to see the device switch work
    BENCH=(--quick "${QUICK[@]}")
    BACKEND=aot_eager COMPILE_LIMIT=300  # graph capture without C++ codegen (minutes on 2 cores)
else
    DEVICE=cuda OUT=docs
    QUICK=(--batch 64 --repeats 5)
    TESTS=()
    BENCH=()
    BACKEND=inductor COMPILE_LIMIT=150  # what is left of the 5 minutes (a timeout fails the step)
fi
REPORT=$OUT/gpu_check_$DATE.md
LOG=$(mktemp)
status=0

section() { echo; echo "== $1"; printf '\n## %s\n\n' "$1" >> "$REPORT"; }
# runs a command, shows its output and keeps its last lines (as a code block) in the report
run() {
    local start=$SECONDS rc
    "$@" 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    { echo '```'; tail -n 25 "$LOG"; echo '```'; echo; echo "exit status $rc, $((SECONDS - start)) s"; } >> "$REPORT"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

mkdir -p "$OUT"
echo "# GPU check $DATE" > "$REPORT"
section "Machine"
run "$PYTHON" - "$DEVICE" <<'EOF'
import sys, torch, transformers, timm
device = torch.device(sys.argv[1])
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers "
      f"{transformers.__version__}; timm {timm.__version__}")
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
EOF
[ $? -eq 0 ] || { echo "gpu_check: the machine check failed, stopping"; exit 1; }

section "Equivalence tests on $DEVICE"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    SIMMIM_TEST_DEVICE=$DEVICE run "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_equivalence.py \
        tests/test_swinv2.py -k "match" "${TESTS[@]}"
else
    echo "pytest is not installed: skipped" | tee -a "$REPORT"
fi

section "Benchmark: ours against HF, fp32 and bf16"
run "$PYTHON" -m simmim.bench --device "$DEVICE" --precision fp32,bf16 "${BENCH[@]}" \
    --json "$OUT/gpu_bench_$DATE.json" --markdown "$OUT/gpu_bench_$DATE.md"
[ -f "$OUT/gpu_bench_$DATE.md" ] && sed 's/^#/##/' "$OUT/gpu_bench_$DATE.md" >> "$REPORT"

section "Sharded training: FSDP2 bf16 policy, DCP checkpoints"
run "$PYTHON" benchmarks/sharded_check.py --device "$DEVICE"

section "Planner against measured peaks on $DEVICE"
run "$PYTHON" -m simmim.plan.validate "$DEVICE"

section "Compiled mode against eager, bf16"
run timeout "$COMPILE_LIMIT" "$PYTHON" -m simmim.bench --device "$DEVICE" --quick "${QUICK[@]}" \
    --precision bf16 --mode both --backend "$BACKEND" --peers none --json "$OUT/gpu_compile_$DATE.json"

echo
echo "gpu_check: wrote $REPORT ($([ $status -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED'))"
exit $status
