#!/usr/bin/env bash
# The GPU benchmarks in one go, each under its own time limit (one that runs long or fails
# does not take the others with it), with full-size random-weight models built on the GPU.
#
#   bash bench/gpu.sh OUT_DIR [sd15|big|sdxl|all]
#
# OUT_DIR gets one log per benchmark; the console shows them without library warnings.
# Budget on an H100/H200: sd15 about 7 minutes (the compile warm-up is most of it),
# big about 5, sdxl about 8.
set -u
out=${1:?usage: bash bench/gpu.sh OUT_DIR [sd15|big|sdxl|all]}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
python=${PYTHON:-python3}

run() {
    local limit=$1 name=$2
    shift 2
    echo "== $name ($limit s at most): $*"
    local started=$SECONDS
    timeout "$limit" "$python" "$@" >"$out/$name.log" 2>&1
    local status=$?
    grep -v -E "Warning|warn\(|torchao|Failed to load|^\s*$|transformers\]|register_constant" \
        "$out/$name.log" | tail -40
    echo "== $name: exit $status after $((SECONDS - started)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', \
peft.__version__)"

case $part in sd15 | all)
    run 60 sd15-overhead bench/engine_overhead.py --arch sd15-full --repeats 5
    run 60 sd15-oom bench/out_of_memory.py --arch sd15-full --side 2048
    run 330 sd15-worker bench/worker_throughput.py --arch sd15-full --compile on \
        --skip-one-at-a-time
    ;;
esac
case $part in big | all)
    run 150 flux-dev bench/big_models.py --arch flux-dev --steps 20 --repeats 2 --option-steps 2
    run 130 sd35-large bench/big_models.py --arch sd35-large --steps 20 --repeats 2 \
        --option-steps 2
    ;;
esac
case $part in sdxl | all)
    run 90 sdxl-overhead bench/engine_overhead.py --arch sdxl-full --repeats 5
    run 420 sdxl-worker bench/worker_throughput.py --arch sdxl-full --compile on \
        --skip-one-at-a-time
    ;;
esac
