"""Pre-train a GPT model on megatron-core with Megatron-LM's command-line flags.

    torchrun --nproc-per-node 8 pretrain_gpt.py --num-layers 24 --hidden-size 1024 ... [--scaled-embed]
    python pretrain_gpt.py --help       # flags, grouped

Runs on CUDA (nccl) or, without a GPU, on CPU (gloo) through the same code path. The machinery
lives in megatron_patch/training/.
"""

import sys
import warnings

from megatron_patch import interrupts

if __name__ == "__main__":  # Ctrl-C while torch and megatron-core import: one line
    interrupts.during_startup("pretrain_gpt.py")

# Upstream noise that says nothing about this run: megatron-core warns at import time that
# apex/Transformer Engine are absent (expected on CPU), and TransformerConfig's own default
# cuda_graph_scope triggers a deprecation warning.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")

from megatron_patch.training.pretrain import main  # noqa: E402

if __name__ == "__main__":  # required: dist_checkpointing's writer starts spawn-context workers
    sys.exit(interrupts.run_main("pretrain_gpt.py", main))
