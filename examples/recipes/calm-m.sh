#!/usr/bin/env bash
# The official CALM-M run (shaochenze/calm: train_autoencoder.sh, then train_energy.sh) on this package, streamed
# from the 30 shards of The Pile (monology/pile-uncopyrighted, train/00.jsonl.zst .. 29.jsonl.zst):
#   1. the autoencoder on shards 00-01: blocks of 2048 tokens, 256 blocks per step (524,288 tokens), 30,000 steps;
#   2. CALM-M on shards 02-29: blocks of 8192 tokens, 256 blocks per step (2,097,152 tokens), 250,000 steps.
# Both: AdamW (0.9, 0.95), weight decay 0.1, constant learning rate 3e-4, gradient clipping 1.0, bf16, seed 1,
# evaluation on the bundled WikiText-103 test documents every 1,000 steps.
#
#   bash examples/recipes/calm-m.sh PILE_TRAIN_DIR OUTPUT_DIR [NUM_GPUS]     (NUM_GPUS: 8 by default)
#   DRY_RUN=1 bash examples/recipes/calm-m.sh ...                           (print the commands only)
#
# The global batch stays the official one on any number of GPUs: the per-device batch is the official one (8
# autoencoder blocks, 4 CALM blocks) and gradient accumulation makes up the rest (8 GPUs: 4 and 8 steps, as the
# official run; 1 GPU: 32 and 64). Each stage resumes where it stopped when run again (checkpoints every 10,000 /
# 50,000 steps; each holds where every process's stream stands). Multi-node: run this on every machine with
# ACCELERATE_ARGS="--num_machines N --machine_rank R --main_process_ip HOST0 --main_process_port 29500"
# and NUM_GPUS = the GPUs of all machines.
#
# Differences from the official run, on purpose: the data is streamed (tokenised as it is read, nothing
# decompressed or cached first), and the official data/process.py step that cuts documents longer than 10,000 words
# into several is not applied. CALM trains with the official "stream" packing (BOS-prefixed documents, no EOS, no
# padding); drop --packing stream for this package's default, "aligned", with which generate() learns to stop.
# 28 CALM shards on 8 GPUs do not split into whole shards per GPU: every process then reads every shard and
# tokenises every 8th document (transformers_calm.data.split_documents).
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n 2,25p "$0"
    exit 2
fi
PILE=$1
OUTPUT=$2
NUM_GPUS=${3:-8}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VALIDATION=$ROOT/data/wikitext_document_level-test.json
TOKENIZER=${TOKENIZER:-meta-llama/Meta-Llama-3-8B}
if (( 256 % (NUM_GPUS * 8) || 256 % (NUM_GPUS * 4) )); then
    echo "NUM_GPUS=$NUM_GPUS does not divide the official global batch of 256 blocks into per-device batches of 8 and 4" >&2
    exit 2
fi
AE_ACCUMULATION=$(( 256 / (NUM_GPUS * 8) ))
CALM_ACCUMULATION=$(( 256 / (NUM_GPUS * 4) ))
LAUNCH=(accelerate launch --config_file "$ROOT/examples/accelerate/ddp.yaml" --num_processes "$NUM_GPUS" ${ACCELERATE_ARGS:-})
COMMON=(--streaming --dataloader_num_workers 0 --validation_file "$VALIDATION" --bf16 --seed 1
        --learning_rate 3e-4 --lr_scheduler_type constant --adam_beta2 0.95 --weight_decay 0.1 --max_grad_norm 1.0
        --eval_strategy steps --eval_steps 1000 --save_strategy steps --logging_steps 100 --report_to none)

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}
resume_from() {  # --resume_from_checkpoint LAST when the stage's output directory holds checkpoints
    local last
    last=$(ls -d "$1"/checkpoint-* 2> /dev/null | sort -t- -k2 -n | tail -1)
    if [ -n "$last" ]; then echo "--resume_from_checkpoint $last"; fi
}

run "${LAUNCH[@]}" "$ROOT/examples/train_autoencoder.py" "${COMMON[@]}" \
    --tokenizer "$TOKENIZER" --train_file "$PILE/00.jsonl.zst" "$PILE/01.jsonl.zst" \
    --patch_size 4 --latent_size 128 --num_encoder_layers 2 --num_decoder_layers 2 \
    --block_size 2048 --per_device_train_batch_size 8 --gradient_accumulation_steps "$AE_ACCUMULATION" \
    --max_steps 30000 --save_steps 10000 --per_device_eval_batch_size 1 \
    --output_dir "$OUTPUT/autoencoder" $(resume_from "$OUTPUT/autoencoder")

run "${LAUNCH[@]}" "$ROOT/examples/train_calm.py" "${COMMON[@]}" \
    --autoencoder "$OUTPUT/autoencoder" --train_file "$PILE"/0[2-9].jsonl.zst "$PILE"/[12][0-9].jsonl.zst \
    --packing stream --eval_packing stream --hidden_size 1024 --intermediate_size 2752 --num_hidden_layers 16 \
    --num_attention_heads 16 --num_key_value_heads 16 --num_mlp_layers 4 \
    --block_size 8192 --per_device_train_batch_size 4 --gradient_accumulation_steps "$CALM_ACCUMULATION" \
    --max_steps 250000 --save_steps 50000 --per_device_eval_batch_size 1 --metric_for_best_model eval_brierlm \
    --output_dir "$OUTPUT/calm-m" $(resume_from "$OUTPUT/calm-m")
