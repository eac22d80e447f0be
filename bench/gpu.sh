#!/usr/bin/env bash
# Benchmark rows 1-3 on one GPU with a full-size random-weight FLUX.2 [klein] 4B transformer.
#
# Needs Python 3.12 with torch (CUDA), transformers, peft, safetensors, pluggy, numpy, pillow, tqdm.
# diffusers and pydantic come from the wheels in .whl/ (diffusers 0.42.1, pydantic, pydantic-core,
# annotated-types, typing-inspection), installed here into /tmp/site; the host runs from ./host.
# Prints a results table and writes $OUT/gpu_results.md when OUT is set. Extra arguments go to
# bench/gpu.py (e.g. --tiny --device cpu to check the logic without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/host${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu.sh: no .whl/ folder: using the installed diffusers and pydantic" >&2
    export PYTHONPATH="$PWD/host${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python3 bench/gpu.py "$@"
