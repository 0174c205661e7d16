#!/usr/bin/env bash
# Supervised fine-tuning of CALM-M on MetaMathQA, scored by GSM8K exact match (official repository, issue #21: a user
# fine-tuned CALM-M on MetaMathQA by hand and reached 56.9% on GSM8K). With examples/sft.py:
#   - data: meta-math/MetaMathQA (395K question/answer pairs, columns query/response) as prompt/completion, the
#     prompt written "Question: {query}\nAnswer:" (CALM-M is a base model: its Llama-3 tokenizer has no chat
#     template), padded with [PAD] to a multiple of K = 4 so that every answer starts a chunk; the loss is on the
#     answer's chunks only (EOS included), whole examples packed into blocks of 2048 tokens;
#   - training: 3 epochs, global batch 128 blocks, AdamW lr 2e-5 (cosine, 3% warm-up), bf16, full fine-tuning
#     (LORA=1: LoRA r 64 on attention + MLP and the head in full, lr 2e-4);
#   - evaluation (before and after training, on the main process while the others wait: hence --ddp_timeout): the
#     1,319 GSM8K test questions (openai/gsm8k, main), same prompt and padding, answered with
#     do_sample=False (the most frequent of 200 head samples per chunk), up to 512 new tokens; exact match of the
#     last number of the answer with the number after '####'.
#
#   bash examples/recipes/sft-gsm8k.sh CALM_M_DIR OUTPUT_DIR [NUM_GPUS]     (NUM_GPUS: 8 by default)
#   DRY_RUN=1 bash examples/recipes/sft-gsm8k.sh ...                       (print the command only)
#
# CALM_M_DIR is the official CALM-M as published (cccczshao/CALM-M, or its downloaded folder: it loads directly, with
# the tokenizer the authors saved beside it) or a converted copy. Not run here (no GPU): tests/test_sft.py parses the
# command.
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n 2,20p "$0"
    exit 2
fi
MODEL=$1
OUTPUT=$2
NUM_GPUS=${3:-8}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PER_DEVICE=4
if (( 128 % (NUM_GPUS * PER_DEVICE) )); then
    echo "NUM_GPUS=$NUM_GPUS does not divide the global batch of 128 blocks into per-device batches of $PER_DEVICE" >&2
    exit 2
fi
ACCUMULATION=$(( 128 / (NUM_GPUS * PER_DEVICE) ))
if [ -n "${LORA:-}" ]; then
    TUNING=(--lora --lora_r 64 --lora_alpha 128 --lora_mlp --learning_rate 2e-4)
else
    TUNING=(--learning_rate 2e-5)
fi

run() {  # prints the command shell-quoted (it can be copied, and parsed back)
    printf '+'; printf ' %q' "$@"; echo
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

run accelerate launch --config_file "$ROOT/examples/accelerate/ddp.yaml" --num_processes "$NUM_GPUS" \
    "$ROOT/examples/sft.py" --model_name_or_path "$MODEL" \
    --dataset meta-math/MetaMathQA --prompt_field query --completion_field response \
    --prompt_template "Question: {prompt}\nAnswer:" --max_length 2048 --packing \
    --eval_dataset openai/gsm8k --eval_config main --eval_split test --eval_prompt_field question \
    --eval_completion_field answer --metric last_number --max_new_tokens 512 --generation_batch_size 32 \
    "${TUNING[@]}" --num_train_epochs 3 --lr_scheduler_type cosine --warmup_steps 0.03 \
    --per_device_train_batch_size "$PER_DEVICE" --gradient_accumulation_steps "$ACCUMULATION" --bf16 \
    --logging_steps 20 --save_strategy epoch --save_total_limit 1 --dataloader_num_workers 0 --seed 1 \
    --ddp_timeout 7200 --output_dir "$OUTPUT"
