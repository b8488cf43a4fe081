#!/usr/bin/env bash
# Reproduce the README "Benchmarks" figures: the quickstart's pruned model (svd-mp at the MP edge)
# and the magnitude baseline against the dense model, and the dense reference model against itself
# (the noise floor of the machine).
#
#   benchmarks/bench_quickstart.sh            # CPU; also CUDA when torch sees a GPU
#   THREADS=2 ROUNDS=32 benchmarks/bench_quickstart.sh
#
# Writes benchmarks/results/<name>-<device>.json (schema rmtp-bench/1, see docs/bench.md) and the
# plots of the quickstart comparison. Needs runs/quickstart and runs/magnitude (made here if
# missing: ~30 s each on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
threads=${THREADS:-1}
rounds=${ROUNDS:-16}
mkdir -p "$out"
[ -f runs/quickstart/rmtp_model.json ] || rmtp prune recipes/quickstart.yaml --quiet
[ -f runs/magnitude/rmtp_model.json ] || rmtp prune recipes/magnitude.yaml --quiet

run() { echo "+ $*" >&2; "$@"; }

run rmtp bench models/digits_vit.safetensors runs/quickstart runs/magnitude --batch 1,32 --threads "$threads" \
    --rounds "$rounds" --eval --json "$out/quickstart-cpu.json" --plot "$out/quickstart-cpu"
run rmtp bench models/digits_vit.safetensors models/digits_vit.safetensors --batch 1,32 \
    --threads "$threads" --rounds "$rounds" --json "$out/dense-vs-dense-cpu.json"

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    run rmtp bench runs/quickstart --device cuda --batch 1,32,256 --rounds "$rounds" --eval \
        --json "$out/quickstart-cuda.json" --plot "$out/quickstart-cuda"
    run rmtp bench models/digits_vit.safetensors models/digits_vit.safetensors --device cuda \
        --batch 1,32,256 --rounds "$rounds" --json "$out/dense-vs-dense-cuda.json"
fi
