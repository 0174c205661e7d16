#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on a machine with one CUDA GPU, in about 10 minutes:
#
#     benchmarks/gpu_suite.sh RESULTS_DIR [ARGS...]
#
# It uses the torch and transformers the machine already has when they satisfy pyproject.toml's ranges (GPU images
# commonly ship torch 2.11 and transformers 5.17), installs only this package, without dependencies (or, where pip
# cannot, puts src/ on PYTHONPATH), and writes every figure as JSON into RESULTS_DIR, with each run's log:
#   generate_eager.json     bench_generate.py --device cuda --preset calm-m, batch 1, 8 and 32, dynamic cache
#   generate_compiled.json  the same with --compile (static cache, CUDA graphs), both models
#   train_eager.json        bench_train.py --device cuda --preset calm-m (bf16 autocast)
#   train_compiled.json     the same with --compile
#   environment.json        GPU, torch, transformers
# ARGS go to every benchmark after the suite's own (the tests run `RESULTS_DIR --quick --device cpu`).
set -euo pipefail
results=${1:?usage: benchmarks/gpu_suite.sh RESULTS_DIR [ARGS...]}
shift
mkdir -p "$results"
results=$(cd "$results" && pwd)  # before the cd below, so that a relative RESULTS_DIR means where it was given
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

"$python" - <<'EOF'
import sys

import torch
import transformers
from packaging.version import Version

checks = {
    "torch": (Version(torch.__version__.split("+")[0]), Version("2.7"), Version("2.15")),
    "transformers": (Version(transformers.__version__), Version("5.10.4"), Version("6")),
}
for name, (have, low, high) in checks.items():
    if not low <= have < high:
        sys.exit(f"{name} {have} is outside pyproject.toml's range [{low}, {high}): install a release inside it.")
EOF
if ! "$python" -c "import transformers_calm" 2>/dev/null; then
    "$python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD/src"
fi

"$python" - "$results/environment.json" <<'EOF'
import json
import sys

import torch
import transformers

import transformers_calm

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
info = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
        "transformers_calm": transformers_calm.__file__}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
EOF

failed=()
run() {  # run NAME SCRIPT ARGS...: one benchmark, its figures in NAME.json and its output in NAME.log
    local name=$1 script=$2 start=$SECONDS
    shift 2
    echo "=== $name"
    # A failing benchmark is reported at the end; the others still run (a GPU's time is short).
    if ! "$python" "benchmarks/$script" "$@" --json "$results/$name.json" 2>&1 | tee "$results/$name.log"; then
        failed+=("$name")
    fi
    echo "=== $name: $((SECONDS - start)) s"
}

generate=(--device cuda --preset calm-m --batch-sizes 1 8 32 --approx-batch-sizes 1 8 32)
train=(--device cuda --preset calm-m --batch-size 16)
run generate_eager bench_generate.py "${generate[@]}" "$@"
run generate_compiled bench_generate.py "${generate[@]}" --compile "$@"
run train_eager bench_train.py "${train[@]}" "$@"
run train_compiled bench_train.py "${train[@]}" --compile "$@"
if ((${#failed[@]})); then
    echo "=== gpu suite: FAILED: ${failed[*]} (their logs are in $results; the other figures too)" >&2
    exit 1
fi
echo "=== gpu suite: every figure in $results ($SECONDS s)"
