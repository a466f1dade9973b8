#!/usr/bin/env bash
# The accelerator checks and benchmarks in one run, for a machine with an NVIDIA GPU that
# already has jax (CUDA), flax, optax, orbax-checkpoint and torch installed.
#   JAXCHAR_DATA=/path/to/shared/data [BUDGET_S=480] bash benchmarks/gpu_check.sh
# Steps, most important first; each gets at most its own cap and what is left of BUDGET_S
# (a step cut short is reported and the run goes on), so that one short lease records
# whatever fits:
#  1. facts: GPU, driver, JAX version and devices, the backends each config runs here;
#  2. the Pallas kernels' tests on the GPU (tests/test_pallas.py and
#     tests/test_pallas_sampling.py: the split over unit groups and the grid barrier run only
#     here), against the scan loops and the nn.scan reference;
#  3. bench_kernels: the train step with the fused layer as shipped, unrolled 2/4/8, in
#     bfloat16, and with the Pallas kernels in float32 and bfloat16, interleaved in one run;
#  4. bench_generate at 1, 8 and 64 rows: the Pallas sampling kernel against the lax.scan
#     loop and PyTorch's CUDA loop, interleaved;
#  5. bench_train on small, stacked and fast: jaxchar (auto, cudnn, pallas) against PyTorch's
#     cuDNN nn.LSTM in float32 and under float16 autocast (its persistent algorithm),
#     interleaved; the `shakespeare_gpu` config's validation loss after 60 s of training;
#     bench_kernels again with XLA's command buffers for loops (the cheap
#     levers before the kernel); bench_serve with 1, 8 and 64 clients;
#  6. `jaxchar bench` on every shipped config (auto), then with model.impl = "pallas";
#  7. the model, backend and lowering tests on the GPU; the main job; a profile of a step.
# Results land in benchmarks/results/*_gpu.json and, where $OUT is set, are copied there
# with the whole log. Where ../shared/data does not travel with the checkout, copy the
# corpora into an ignored folder first (mkdir -p .gpudata && cp ../shared/data/*.txt
# .gpudata/ && echo /.gpudata/ >> .git/info/exclude), take that folder along, and run with
# JAXCHAR_DATA=.gpudata.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAXCHAR_DATA="${JAXCHAR_DATA:-$PWD/../shared/data}"
# several processes share the GPU (pytest workers; torch beside jax): no preallocation
export XLA_PYTHON_CLIENT_PREALLOCATE=false
RESULTS=benchmarks/results
began=$(date +%s)
budget=${BUDGET_S:-480}
failed=()

step() {  # step NAME CAP_S COMMAND...: runs COMMAND within min(CAP_S, what is left)
    local name=$1 cap=$2 left
    shift 2
    left=$((budget - ($(date +%s) - began)))
    if ((left < 15)); then
        echo "=== $name: skipped, the budget is spent"
        failed+=("$name (skipped)")
        return
    fi
    ((cap > left)) && cap=$left
    echo "=== $name (at most ${cap} s; $(($(date +%s) - began)) s in)"
    local t0=$(date +%s)
    timeout -k 5 "$cap" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t0)) s"
    ((rc == 0)) || failed+=("$name (exit $rc)")
}

step facts 40 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv &&
    python3 -c "import jax, flax, optax, orbax.checkpoint as o; print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, jax.devices())" &&
    python3 -m jaxchar env'
# the kernels' own tolerances hold TF32 products (XLA's default on Hopper, and Triton's)
step pallas-tests 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -o addopts="" \
    -p no:cacheprovider -p no:benchmark -n 4 tests/test_pallas.py -x -rs
# the sampling kernel draws in IEEE float32; the scan it must match, too (no TF32)
step pallas-sampling-tests 120 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
    python3 -m pytest -q -o addopts="" -p no:cacheprovider -p no:benchmark -n 4 \
    tests/test_pallas_sampling.py -x -rs
step kernels 100 python3 benchmarks/bench_kernels.py --configs small stacked fast --reps 10
step bench-generate 60 python3 benchmarks/bench_generate.py --batches 1 8 64 --reps 3 \
    --peers torch --pallas --no-window
step bench-train 100 python3 benchmarks/bench_train.py --configs small stacked fast --reps 10 \
    --peers torch torch-half
# issue 41's GPU goal: tiny Shakespeare validation <= 1.40 in under 60 s, compilation included
step quality 90 python3 benchmarks/bench_quality.py --config shakespeare_gpu \
    --corpus tinyshakespeare.txt --budget-s 60 --name shakespeare_gpu_gpu
# while loops and conditionals captured into CUDA graphs, where this XLA offers it
step kernels-cmdbuf 60 env XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    python3 benchmarks/bench_kernels.py --configs small fast --reps 5 --tag cmdbuf
step bench-serve 90 python3 benchmarks/bench_serve.py --clients 1 8 64 --reps 2 \
    --engine-impls auto pallas
step bench 90 python3 -m jaxchar bench --config small --config stacked --config fast \
    --config shakespeare --config code --json "$RESULTS/bench_gpu.json"
step bench-pallas 70 python3 -m jaxchar bench --config small --config stacked --config fast \
    --set model.impl=pallas --json "$RESULTS/bench_gpu_pallas.json"
# float32 products (no TF32), so that the tolerances written for the CPU hold;
# -o addopts="": the project's pytest options need not apply there
step tests 200 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest \
    -q -o addopts="" -p no:cacheprovider -p no:benchmark -n 8 tests/test_model.py tests/test_backends.py \
    tests/test_lowering.py -rs
run=$(mktemp -d)
step main-job 70 bash -c "time python3 -m jaxchar train alice --run-dir $run/fast --epochs 1 &&
    time python3 -m jaxchar generate $run/fast --length 300"
step profile 30 python3 benchmarks/profile_step.py train --config small
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*_gpu*.json "$OUT"/ 2>/dev/null; fi
echo "=== done after $(($(date +%s) - began)) s; not passed: ${failed[*]:-none}"
((${#failed[@]} == 0))
