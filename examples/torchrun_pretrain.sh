#!/usr/bin/env bash
# Launch pretrain_gpt.py with torchrun on this node: one process per GPU (or N CPU processes).
#
#   Single node:  bash examples/torchrun_pretrain.sh [--nproc-per-node 8] -- <pretrain_gpt.py flags>
#   Multi-node:   on every node the same command, with NNODES and MASTER_ADDR set, e.g.
#                 NNODES=4 MASTER_ADDR=node001 bash examples/torchrun_pretrain.sh -- <flags>
#                 (c10d rendezvous at MASTER_ADDR:MASTER_PORT; ranks are assigned by the rendezvous)
#
# Options, each with the environment variable it overrides:
#   --nproc-per-node N  GPUS_PER_NODE  processes on this node (default: the GPU count, else 1)
#   --nnodes N          NNODES         nodes in the run (default 1)
#   --master-addr HOST  MASTER_ADDR    rendezvous host, multi-node only (default localhost)
#   --master-port PORT  MASTER_PORT    rendezvous port, multi-node only (default 29500)
#   --rdzv-id ID        RDZV_ID        run id shared by the nodes (default SLURM_JOB_ID, else megatron_patch)
#   --python PY         PYTHON         interpreter with megatron_patch installed (default .venv/bin/python, else python3)
#   --socket-ifname IF  SOCKET_IFNAME  network interface for Gloo and NCCL between the nodes (sets
#                                      GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME); needed where a
#                                      node's hostname resolves to an address other nodes cannot reach
# One node uses torchrun --standalone (a free local port), so several runs can share a machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "torchrun_pretrain.sh: error: $*" >&2; exit 2; }

nproc="${GPUS_PER_NODE:-}"
nnodes="${NNODES:-1}"
master_addr="${MASTER_ADDR:-localhost}"
master_port="${MASTER_PORT:-29500}"
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-megatron_patch}}"
# shellcheck source=tools/find_python.sh
source "$root/tools/find_python.sh"
python="$(find_python "$root")"
ifname="${SOCKET_IFNAME:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc-per-node) nproc="${2:?}"; shift 2 ;;
        --nnodes) nnodes="${2:?}"; shift 2 ;;
        --master-addr) master_addr="${2:?}"; shift 2 ;;
        --master-port) master_port="${2:?}"; shift 2 ;;
        --rdzv-id) rdzv_id="${2:?}"; shift 2 ;;
        --python) python="${2:?}"; shift 2 ;;
        --socket-ifname) ifname="${2:?}"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
        *) die "unknown option $1; pretrain_gpt.py flags go after --" ;;
    esac
done
[ $# -gt 0 ] || die "no pretrain_gpt.py flags (put them after --)"
if [ -z "$nproc" ]; then
    nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [ "${nproc:-0}" -gt 0 ] || nproc=1
fi

if [ "$nnodes" = 1 ]; then
    launch=(--standalone --nnodes 1)
else
    launch=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port"
            --rdzv-id "$rdzv_id")
fi
if [ -n "$ifname" ]; then
    export GLOO_SOCKET_IFNAME="$ifname" NCCL_SOCKET_IFNAME="$ifname"
fi
echo "torchrun_pretrain.sh: $(hostname): $nnodes node(s) x $nproc process(es)${ifname:+, interface $ifname}" >&2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m torch.distributed.run "${launch[@]}" --nproc-per-node "$nproc" \
    "$root/pretrain_gpt.py" "$@"
