#!/usr/bin/env bash
# pretrain_gpt.py on DeepSpeed's engine: examples/torchrun_pretrain.sh with --deepspeed added.
#
#   bash examples/deepspeed/pretrain.sh [--zero 1|2|3 | --config FILE.json] [launcher options] -- <pretrain_gpt.py flags>
#
#   --zero N         examples/deepspeed/zeroN.json (default 1)
#   --config FILE    any DeepSpeed JSON (or DS_CONFIG=FILE); e.g. zero2_bf16.json, with --bf16, on GPUs
# Launcher options (--nproc-per-node, --nnodes, --master-addr, ...) go to examples/torchrun_pretrain.sh.
# Batch sizes, clipping, precision, optimizer and lr schedule come from the pretrain_gpt.py flags
# (docs/deepspeed.md). Example, CPU, 2 processes, random tokens:
#   bash examples/deepspeed/pretrain.sh --zero 2 --nproc-per-node 2 -- --num-layers 2 --hidden-size 64 \
#       --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --global-batch-size 8 \
#       --train-iters 20 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 200 \
#       --log-interval 5 --eval-iters 0
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${DS_CONFIG:-$here/zero1.json}"
launcher=()
while [ $# -gt 0 ]; do
    case "$1" in
        --zero) config="$here/zero${2:?}.json"; shift 2 ;;
        --config) config="${2:?}"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
        *) launcher+=("$1"); shift ;;
    esac
done
[ -f "$config" ] || { echo "pretrain.sh: error: DeepSpeed config $config not found" >&2; exit 2; }
exec bash "$here/../torchrun_pretrain.sh" ${launcher[@]+"${launcher[@]}"} -- \
    --deepspeed --deepspeed-config "$config" "$@"
