#!/usr/bin/env bash
# The GPU benchmarks in one go, each under its own time limit (one that runs long or fails
# does not take the others with it), with full-size random-weight models built on the GPU.
#
#   bash bench/gpu.sh OUT_DIR PART...
#
# PART: sd15 (engine overhead and out-of-memory), worker15 (the compiled SD 1.5 worker
# against bare diffusers), int8, float8, model, sequential (FLUX.1-dev's memory options,
# each in a process of its own), sd35, sdxl, workerxl; all runs every one.
# OUT_DIR gets one log per benchmark; the console shows them without library warnings.
# Budget on an H100/H200: sd15 about 2 minutes, worker15 about 6 (the compile warm-up is
# most of it), int8, float8 and model about 1 each, sd35 about 2, sdxl about 2, workerxl about 10.
set -u
out=${1:?usage: bash bench/gpu.sh OUT_DIR PART...}
shift
parts=" ${*:-all} "
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

wants() { [[ $parts == *" $1 "* || $parts == *" all "* ]]; }

if wants sd15; then
    run 60 sd15-overhead bench/engine_overhead.py --arch sd15-full --repeats 5
    run 60 sd15-oom bench/out_of_memory.py --arch sd15-full --side 2048
fi
if wants worker15; then
    # Batches of 8 at two sizes, styled or not, and (c) on a batch of 8: six graphs.
    run 440 sd15-worker bench/worker_throughput.py --arch sd15-full --compile on \
        --skip-one-at-a-time --latency-count 8 --repeats 3 --rounds 1
fi
for option in int8 float8 model; do  # parts int8, float8 and model: one process each
    if wants "$option"; then
        run 100 "flux-$option" bench/big_models.py --arch flux-dev --skip-overhead \
            --options "$option" --option-steps 4 --option-repeats 2
    fi
done
if wants sequential; then
    run 120 flux-sequential bench/big_models.py --arch flux-dev --skip-overhead \
        --options sequential --option-steps 1 --option-repeats 1
fi
if wants sd35; then
    run 150 sd35-large bench/big_models.py --arch sd35-large --steps 20 --repeats 2 \
        --options int8,float8,model --option-steps 4 --option-repeats 1
fi
if wants sdxl; then
    run 90 sdxl-overhead bench/engine_overhead.py --arch sdxl-full --repeats 5
fi
if wants workerxl; then
    run 600 sdxl-worker bench/worker_throughput.py --arch sdxl-full --compile on \
        --skip-one-at-a-time --latency-count 8 --repeats 3 --rounds 1
fi
