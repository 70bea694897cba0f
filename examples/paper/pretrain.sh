#!/usr/bin/env bash
# One "Spike No More" paper run: model size x method (x learning rate) on this node or cluster.
#
#   bash examples/paper/pretrain.sh --size {350m,1.7b,13b} \
#        --method {vanilla,embed_detach,embed_ln,scaled_embed,xavier_init,sigma1_embed,wesar} [--lr X] [--precision fp16|bf16] \
#        [--run-dir DIR] [--dry-run | --print-flags] [-- more pretrain_gpt.py flags]
#
# The flags come from readable files, later ones overriding earlier ones:
#   common.args -> sizes/<size>.args -> methods/<method>.args -> --lr/--precision -> layout -> flags after --
# The layout (TP, PP, micro-batch; DP follows) is chosen for NNODES x GPUS_PER_NODE GPUs of
# GPU_MEMORY_GB by the dry run's planner and printed; give --tensor-model-parallel-size,
# --pipeline-model-parallel-size or --micro-batch-size after -- to choose it yourself.
#   --dry-run      print the plan (parameters, memory per GPU, tokens and FLOPs per step) and stop;
#                  exit status 1 if it does not fit. Needs no GPU and no data.
#   --print-flags  print the pretrain_gpt.py flags, one per line (examples/slurm/pretrain.sbatch uses it)
#   otherwise      launch on this node with examples/torchrun_pretrain.sh (run it on every node)
#
# Environment (as torchrun/Slurm set it):
#   NNODES (SLURM_NNODES, else 1), GPUS_PER_NODE (SLURM_GPUS_ON_NODE, else nvidia-smi's count,
#   else 8 for --dry-run), MASTER_ADDR, MASTER_PORT, RDZV_ID (multi-node rendezvous, see
#   examples/torchrun_pretrain.sh), GPU_MEMORY_GB (80), PYTHON (default .venv/bin/python, else python3),
#   DATA_PATH (prefix of the GPT-2-BPE-tokenized C4 .bin/.idx; "mock" = random tokens, a smoke
#   test of the cluster), VOCAB_FILE, MERGE_FILE (GPT-2's).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "pretrain.sh: error: $*" >&2; exit 2; }

size="" method="" lr="" precision="fp16" run_dir="" mode="run"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size="${2:?--size needs a value}"; shift 2 ;;
        --method) method="${2:?--method needs a value}"; shift 2 ;;
        --lr) lr="${2:?--lr needs a value}"; shift 2 ;;
        --precision) precision="${2:?--precision needs a value}"; shift 2 ;;
        --run-dir) run_dir="${2:?--run-dir needs a value}"; shift 2 ;;
        --dry-run) mode="dry-run"; shift ;;
        --print-flags) mode="print-flags"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
choices() { local f names=(); for f in "$here/$1"/*.args; do f="${f##*/}"; names+=("${f%.args}"); done; echo "${names[*]}"; }
[ -f "$here/sizes/$size.args" ] || die "--size must be one of: $(choices sizes)"
[ -f "$here/methods/$method.args" ] || die "--method must be one of: $(choices methods)"
case "$precision" in fp16|bf16) ;; *) die "--precision must be fp16 or bf16" ;; esac

# Flags from the .args files: drop comments, split on whitespace (the files use no quoting).
flags=()
for file in "$here/common.args" "$here/sizes/$size.args" "$here/methods/$method.args"; do
    while read -r -a words; do
        flags+=("${words[@]}")
    done < <(sed 's/#.*//' "$file")
done
[ -z "$lr" ] || flags+=(--lr "$lr")
flags+=("--$precision")  # [unverified] the paper trained in fp16

if [ "${DATA_PATH:-}" = mock ] || { [ -z "${DATA_PATH:-}" ] && [ "$mode" = "dry-run" ]; }; then
    flags+=(--mock-data --vocab-size 50256)  # random tokens; GPT-2's 50257 ids (50256 + end-of-document)
elif [ -n "${DATA_PATH:-}" ]; then
    flags+=(--data-path "$DATA_PATH" --tokenizer-type GPT2BPETokenizer
            --vocab-file "${VOCAB_FILE:?set VOCAB_FILE (GPT-2 vocab.json)}"
            --merge-file "${MERGE_FILE:?set MERGE_FILE (GPT-2 merges.txt)}")
else
    die "set DATA_PATH (prefix of the tokenized C4 .bin/.idx), VOCAB_FILE and MERGE_FILE; see docs/reproduce.md"
fi
if [ "$mode" != "dry-run" ]; then
    run_dir="${run_dir:-$root/runs/$size-$method${lr:+-lr$lr}}"
    flags+=(--save "$run_dir/checkpoints" --load "$run_dir/checkpoints" --exit-signal-handler
            --tensorboard-dir "$run_dir/tensorboard")
fi

nnodes="${NNODES:-${SLURM_NNODES:-1}}"
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
if [ -z "$gpus" ] && command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if [ -z "$gpus" ] || [ "$gpus" = 0 ]; then
    [ "$mode" = "run" ] && die "no GPU found: set GPUS_PER_NODE (or use --dry-run)"
    gpus=8
    echo "pretrain.sh: planning for 8 GPUs per node (set GPUS_PER_NODE)" >&2
fi
# shellcheck source=tools/find_python.sh
source "$root/tools/find_python.sh"
python="$(find_python "$root")"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# The layout: chosen by the planner unless given after --.
plan_args=(--world-size "$((nnodes * gpus))" --gpu-memory-gb "${GPU_MEMORY_GB:-80}")
user_layout=0
for flag in "${extra[@]}"; do
    case "$flag" in --tensor-model-parallel-size|--pipeline-model-parallel-size|--micro-batch-size) user_layout=1 ;; esac
done
if [ "$user_layout" = 1 ]; then
    plan_args+=("${flags[@]}" "${extra[@]}")
else
    plan_args+=(--choose-layout --gpus-per-node "$gpus" "${flags[@]}" "${extra[@]}")
fi
echo "pretrain.sh: $size $method${lr:+ lr $lr} on $nnodes node(s) x $gpus GPU(s)" >&2
status=0
report="$("$python" -W ignore -m megatron_patch.training.dry_run "${plan_args[@]}")" || status=$?
out=1
[ "$mode" = "print-flags" ] && out=2  # keep stdout for the flags
grep -v '^layout flags: ' <<<"$report" >&"$out" || true
[ "$mode" = "dry-run" ] && exit "$status"
[ "$status" = 0 ] || die "no valid plan (see above)"
read -r -a layout <<<"$(sed -n 's/^layout flags: //p' <<<"$report")"
flags+=("${layout[@]}" "${extra[@]}")

if [ "$mode" = "print-flags" ]; then
    printf '%s\n' "${flags[@]}"
    exit 0
fi
export NNODES="$nnodes" GPUS_PER_NODE="$gpus"
exec bash "$root/examples/torchrun_pretrain.sh" -- "${flags[@]}"
