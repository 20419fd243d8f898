#!/usr/bin/env bash
# The GPU benchmark in one call: installs what the lent GPU machine lacks from wheels carried in .whl/,
# then runs `ftjob bench` at the ruGPT3small shape and prints the table last.
#
# Prepare the wheels here (CPU machine, repo root), once:
#   echo /.whl/ >> .git/info/exclude
#   DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hjson pydantic pydantic-core annotated-types typing-inspection accelerate==1.15.0
# Then run this script on the GPU machine with .whl carried (device tool: carry [".whl"]).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
# Training variants (each in its own process) + the loader; the data path is measured on CPU machines.
python3 -m job.bench --only "${ONLY:-hf_trainer_original,ftjob_b64,ftjob_b64_zero0,ftjob_b64_compile,ftjob_original,ftjob_b1024,loader}" \
  --warmup "${WARMUP:-10}" --steps "${STEPS:-40}" --json "${OUT:-/tmp}/bench.json"
