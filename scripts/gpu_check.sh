#!/usr/bin/env bash
# The GPU loop, one device call: build for sm_90a, run every test on CUDA, run the benchmarks,
# run compute-sanitizer (memcheck, racecheck) over the quantization tests, and record it all in
# benchmarks/results/gpu_run.json (+ the benchmark JSON/PNG), copied to $OUT.
#
#   LOWRANK_COMMIT=$(git rev-parse HEAD) LOWRANK_CSRC_TREE=$(git rev-parse HEAD:csrc) bash scripts/gpu_check.sh
#
# (the device machine gets a copy of the work tree without .git, so the commit comes in by env).
# Steps: build | tests | bench | sanitizer; LOWRANK_STEPS picks a subset (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lowrank_gpu_out}
mkdir -p "$OUT" benchmarks/results
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# ../shared does not travel to the device: a carried copy of the golden file goes in .testdata/
[ -f .testdata/bnb_4bit_golden.safetensors ] && export LOWRANK_GOLDEN="$PWD/.testdata/bnb_4bit_golden.safetensors"
STEPS=${LOWRANK_STEPS:-build,tests,bench,sanitizer}
has() { [[ ",$STEPS," == *",$1,"* ]]; }

# Peers for the benchmarks only (carried wheels, e.g. bitsandbytes); the library never imports them.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/nvidia_smi.csv" 2>&1

t0=$(date +%s)
if has build; then
  echo "== build (sm_90a, MAX_JOBS=16)"
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/build.log"
fi

if has tests; then
  echo "== tests"
  t1=$(date +%s)
  # one process per file: a crash in one file cannot hide the results of the others
  rm -f "$OUT"/junit_*.xml "$OUT/pytest.log"
  for f in tests/test_*.py; do
    name=$(basename "$f" .py)
    python3 -m pytest "$f" -q -p no:cacheprovider --junitxml="$OUT/junit_$name.xml" >> "$OUT/pytest.log" 2>&1
    echo "$name rc=$?"
  done
  echo "tests in $(( $(date +%s) - t1 )) s"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -8
fi

if has debug; then  # native backtrace of one test: LOWRANK_DEBUG_TEST="file::name"
  cuda-gdb -q -batch -ex run -ex bt --args python3 -m pytest "${LOWRANK_DEBUG_TEST}" -q -p no:cacheprovider \
    > "$OUT/debug_backtrace.log" 2>&1
  grep -E "^#|signal|Error" "$OUT/debug_backtrace.log" | head -40
fi

if has bench; then
  echo "== bench_quant"
  python3 benchmarks/bench_quant.py --out benchmarks/results/bench_quant.json 2>&1 | tee "$OUT/bench_quant.log"
fi

if has profile; then  # ncu on the hot kernels (second launch of each)
  ncu --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis -k regex:"quantize_4bit_full_blocks|dequantize_4bit_words" -s 2 -c 3 \
    python3 scripts/profile_quant.py > "$OUT/ncu_quant.txt" 2>&1
  echo "ncu rc=$?"; grep -E "quantize_4bit|Duration|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|No Eligible|Stall" "$OUT/ncu_quant.txt" | head -60
fi

if has sanitizer; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool"
    HYPOTHESIS_PROFILE=sanitizer timeout 300 compute-sanitizer --tool "$tool" --target-processes all \
      --error-exitcode 99 python3 -m pytest tests/test_quant_ops.py tests/test_golden.py -q -k cuda \
      -p no:cacheprovider > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -3
  done
fi

python3 scripts/record_gpu_run.py --out-dir "$OUT" --json benchmarks/results/gpu_run.json
cp benchmarks/results/*.json benchmarks/results/*.png "$OUT/" 2>/dev/null
echo "total $(( $(date +%s) - t0 )) s"
