#!/usr/bin/env bash
# The paper reproduction in one call on a GPU machine whose image holds other package versions (docs/results.md):
#
#   bash benchmarks/gpu_reproduction.sh RESULTS_DIR COMMIT [reproduce_paper.py options, e.g. --minutes 7 --paper_experiments]
#
# Needs data/mnist.npz (reproduce_paper.py --prepare_data) and, optionally, wheels in .whl/ that are put ahead of the
# image's packages (the transformers this package is tested with: the GPU image has an older one). Runs a smoke
# reproduction first (a few seconds of training, no compile), so that an incompatibility fails within a minute instead
# of after the budget, then the full one. RESULTS_DIR receives the two reports and logs, and the MNIST model folder as
# a tar in 15 MB parts (a transport that takes files of at most 16 MiB).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "gpu_reproduction.sh: error: usage: gpu_reproduction.sh RESULTS_DIR COMMIT [reproduce_paper.py options]" >&2
    exit 2
fi
mkdir -p "$1"
results=$(cd "$1" && pwd) commit=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -c 'import accelerate, torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'

scratch=$(mktemp -d)
"$python" benchmarks/reproduce_paper.py --data data/mnist.npz --minutes 0.3 --no_compile --output_dir "$scratch/smoke" \
    --commit "$commit" --json "$results/smoke.json" >"$results/smoke.log" 2>&1 \
    || { tail -n 30 "$results/smoke.log"; exit 1; }
status=0
"$python" benchmarks/reproduce_paper.py --data data/mnist.npz --output_dir "$scratch/paper" --commit "$commit" \
    --json "$results/reproduction.json" "$@" >"$results/reproduction.log" 2>&1 || status=$?
tr '\r' '\n' <"$results/reproduction.log" | grep -v -E 'it/s|s/it' | tail -n 60 || true  # grep: 1 when nothing is left
# The MNIST folder also when a later stage failed (the report then says which and keeps the stages before it).
if [[ -d "$scratch/paper/capsnet-mnist" ]]; then
    tar -C "$scratch/paper" -cf - capsnet-mnist | split -b 15M - "$results/capsnet-mnist.tar.part-"
fi
ls -l "$results"
exit "$status"
