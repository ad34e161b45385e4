#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu/ carried (tests/gpu/pack.py made it here):
#   bash tests/gpu/run.sh            -> $OUT/gpu_acceptance.json (or ./gpu_acceptance.json without $OUT)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl \
  || { echo "could not install .gpu/wheels: run tests/gpu/pack.py here first"; exit 2; }
export PYTHONPATH="$PWD:$PWD/.gpu/site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -f .gpu/megatron-lm.tar.gz ]; then
  mkdir -p /tmp/mlm && tar -xzf .gpu/megatron-lm.tar.gz -C /tmp/mlm
  # Megatron's dataset index helpers are a C++ extension built for this Python.
  if make -C /tmp/mlm/megatron-lm/megatron/core/datasets >/tmp/mlm/make.log 2>&1; then
    export MEGATRON_LM_DIR=/tmp/mlm/megatron-lm
  else
    echo "Megatron-LM's dataset helpers did not build (tail of /tmp/mlm/make.log below): stage megatron_lm skips"
    tail -5 /tmp/mlm/make.log
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python3 tests/gpu/acceptance.py --data .gpu/data/embedded --out "${OUT:-.}/gpu_acceptance.json" "$@"
