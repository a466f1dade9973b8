#!/usr/bin/env bash
# The accelerator checks and benchmarks in one run, for a machine with an NVIDIA GPU that
# already has jax (CUDA), flax, optax, orbax-checkpoint and torch installed.
#   JAXCHAR_DATA=/path/to/shared/data bash benchmarks/gpu_check.sh
# 1. facts: GPU, driver, JAX version and devices; `jaxchar bench` on every shipped config;
# 2. the model and backend tests on the GPU: the cuDNN layer (model.impl = "cudnn") and the
#    fused layer against the nn.scan reference, values and gradients; the sampler under jit
#    and vmap on every shipped config;
# 3. bench_train on small, stacked and fast: jaxchar fused, jaxchar cudnn and PyTorch's
#    cuDNN nn.LSTM, interleaved; the epoch column answers "small epoch under 5 s";
# 4. bench_generate at batch 1 and 64 (the PyTorch loop on CUDA);
# 5. profile_step on the small config's train step and on sampling at batch 64: where the
#    GPU's time goes, kernel by kernel.
# Results land in benchmarks/results/*_gpu.json and, where $OUT is set, are copied there.
# Where ../shared/data does not travel with the checkout, copy the corpora into an ignored
# folder first (mkdir -p .gpudata && cp ../shared/data/*.txt .gpudata/ && echo /.gpudata/ >>
# .git/info/exclude), take that folder along, and run with JAXCHAR_DATA=.gpudata.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAXCHAR_DATA="${JAXCHAR_DATA:-$PWD/../shared/data}"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || status=1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())" || exit 1
python3 -m jaxchar env || status=1  # the backends each config runs on this GPU
# jaxchar alone on this device, every shipped config: what users will compare
python3 -m jaxchar bench --json benchmarks/results/bench_gpu.json || status=1
# float32 products (no TF32), so that the tolerances written for the CPU hold; one process
# (-o addopts="": pytest-xdist need not be installed there)
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_model.py tests/test_backends.py tests/test_lowering.py || status=1
python3 benchmarks/bench_train.py --configs small stacked fast --reps 20 --peers torch || status=1
python3 benchmarks/bench_generate.py --batches 1 64 --reps 5 || status=1
python3 benchmarks/profile_step.py train --config small || status=1
python3 benchmarks/profile_step.py generate --batch 64 || status=1
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*_gpu.json "$OUT"/ 2>/dev/null; fi
exit $status
