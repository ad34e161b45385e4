#!/usr/bin/env bash
# MEGATRON_LM_DIR=/path/to/Megatron-LM DATA_PATH=/data/c4/c4_text_document REFERENCE=/data/lambada.jsonl \
#   CHECKPOINT_DIR=/ckpt/mates-410m bash examples/megatron_lm/pretrain_gpt_mates.sh
#
# The MATES paper setting on Megatron-LM: a Pythia-410M-like GPT (MODEL_SIZE=1b: Pythia-1B-like), 1,024-token
# sequences, global batch 512, 50k steps; from step 10k on, every 10k steps the live model is probed on
# LAMBADA, the data influence model is fitted and the next 10k steps train on the best 20% of their
# candidates (Gumbel-top-k, temperature 0.5). Selection settings: configs/paper_${MODEL_SIZE}.yaml.
#
# Needs: Megatron-LM at tag core_v0.16.1 (or core_v0.19.0) with patches/megatron-lm-<tag>-mates.patch applied,
# and this package installed in the same Python environment (see examples/megatron_lm/README.md).
#
# Environment:
#   MEGATRON_LM_DIR  patched Megatron-LM checkout (required)
#   DATA_PATH        indexed dataset prefix PREFIX of PREFIX.bin/.idx, GPT-NeoX tokens (required)
#   REFERENCE        reference set JSONL, {"context", "target"} lines, e.g. LAMBADA (required)
#   CHECKPOINT_DIR   --save/--load directory; rerunning resumes from it (required)
#   MODEL_SIZE       410m (default) or 1b
#   TOKENIZER_MODEL  GPT-NeoX tokenizer, HF name or local dir (default EleutherAI/gpt-neox-20b)
#   NPROC_PER_NODE   GPUs per node (default 8); NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several nodes
#   TP, PP           tensor / pipeline parallel sizes (default 1, 1)
#   MICRO_BATCH_SIZE micro-batch per GPU (default 16; the global batch stays 512)
# Extra arguments are passed on to pretrain_gpt.py and override the defaults, e.g. --mates-estimator linearized.
set -euo pipefail

fail() {
    echo "pretrain_gpt_mates.sh: $*" >&2
    exit 1
}
need() {
    [[ -n "${!1:-}" ]] || fail "set $1: $2"
}

need MEGATRON_LM_DIR "a Megatron-LM checkout at core_v0.16.1 or core_v0.19.0 with its MATES patch applied"
need DATA_PATH "the indexed dataset prefix (PREFIX.bin and PREFIX.idx, GPT-NeoX tokens)"
need REFERENCE "the reference set JSONL (LAMBADA as {\"context\", \"target\"} lines)"
need CHECKPOINT_DIR "where checkpoints (and the MATES state beside them) are written and resumed from"

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL_SIZE="${MODEL_SIZE:-410m}"
MATES_CONFIG="$REPO_DIR/configs/paper_${MODEL_SIZE}.yaml"
PATCH="patches/megatron-lm-core_v0.16.1-mates.patch" # core_v0.19.0: patches/megatron-lm-core_v0.19.0-mates.patch

[[ -f "$MEGATRON_LM_DIR/pretrain_gpt.py" ]] || fail "MEGATRON_LM_DIR=$MEGATRON_LM_DIR has no pretrain_gpt.py"
grep -q add_mates_args "$MEGATRON_LM_DIR/pretrain_gpt.py" \
    || fail "Megatron-LM is not patched: git -C \"$MEGATRON_LM_DIR\" apply \"$REPO_DIR/$PATCH\""
[[ -f "$DATA_PATH.bin" && -f "$DATA_PATH.idx" ]] || fail "DATA_PATH=$DATA_PATH: $DATA_PATH.bin/.idx not found"
[[ -f "$REFERENCE" ]] || fail "REFERENCE=$REFERENCE: no such file"
[[ -f "$MATES_CONFIG" ]] || fail "MODEL_SIZE=$MODEL_SIZE: no $MATES_CONFIG (use 410m or 1b)"
python -c "import mates_megatron.integrations.megatron_lm" 2>/dev/null \
    || fail "mates_megatron is not importable by this python: pip install -e \"$REPO_DIR\""

case "$MODEL_SIZE" in
    # Pythia shapes (EleutherAI; lit_gpt/config.py of the MATES code): layers, hidden, heads, FFN = 4 x hidden.
    410m) MODEL_ARGS=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 4096) ;;
    1b) MODEL_ARGS=(--num-layers 16 --hidden-size 2048 --num-attention-heads 8 --ffn-hidden-size 8192) ;;
    *) fail "MODEL_SIZE=$MODEL_SIZE: use 410m or 1b" ;;
esac

MODEL_ARGS+=(
    --seq-length 1024
    --max-position-embeddings 1024
    --position-embedding-type rope
    --rotary-percent 0.25 # GPT-NeoX rotates a quarter of each head
    --normalization LayerNorm
    --untie-embeddings-and-output-weights
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --init-method-std 0.02
    --bf16
)
# The reference trains 50k steps of 512 x 1,024 tokens: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, lr 1e-3
# after a 4% warm-up (2,000 steps), held constant, with a short decay before evaluation (WSD).
TRAIN_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-16}"
    --global-batch-size 512
    --train-iters 50000
    --lr 1e-3
    --min-lr 1e-4
    --lr-warmup-iters 2000
    --lr-decay-style WSD
    --lr-wsd-decay-style exponential
    --lr-wsd-decay-iters 200
    --lr-decay-iters 50000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --seed 1234
    --tensor-model-parallel-size "${TP:-1}"
    --pipeline-model-parallel-size "${PP:-1}"
)
DATA_ARGS=(
    --data-path "$DATA_PATH" # one prefix: the MATES pool is its GPTDataset
    --split 998,1,1
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model "${TOKENIZER_MODEL:-EleutherAI/gpt-neox-20b}"
    --num-workers 2
)
CKPT_ARGS=(
    --save "$CHECKPOINT_DIR"
    --load "$CHECKPOINT_DIR"
    --save-interval 5000
    --ckpt-format torch_dist
    --log-interval 100
    --eval-interval 1000
    --eval-iters 10
    --tensorboard-dir "$CHECKPOINT_DIR/tensorboard"
)
MATES_ARGS=(
    --mates
    --mates-config "$MATES_CONFIG"
    --mates-reference "$REFERENCE"
)

export CUDA_DEVICE_MAX_CONNECTIONS=1
cd "$MEGATRON_LM_DIR"
exec torchrun \
    --nproc-per-node "${NPROC_PER_NODE:-8}" \
    --nnodes "${NNODES:-1}" \
    --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-localhost}" \
    --master-port "${MASTER_PORT:-6000}" \
    pretrain_gpt.py \
    "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "${MATES_ARGS[@]}" "$@"
