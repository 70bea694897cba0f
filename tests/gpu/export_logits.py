"""Compare an HF export's logits with megatron's for the same checkpoint, both in fp32 on the GPU
(on the CPU without one); prints one JSON line (driven by tests/gpu/check.py's export part).

    python tests/gpu/export_logits.py CKPT_DIR HF_DIR
"""

import json
import sys
import warnings

import torch

# Run by check.py with the repository root on PYTHONPATH (megatron_patch need not be installed).
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")

# fp32 on both sides, without TF32 (torch's default for matmuls, stated so a changed default shows).
TOLERANCE = 1e-3


def main(ckpt: str, hf_dir: str) -> int:
    from transformers import AutoModelForCausalLM

    from megatron_patch.export import megatron_io

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with megatron_io.loaded_checkpoint(ckpt) as (model, args, common):
        vocab = common.get("vocab_size") or args.vocab_size
        tokens = torch.randint(0, vocab, (2, args.seq_length), generator=torch.Generator().manual_seed(0))
        ours = megatron_io.megatron_logits(model.to(device), tokens.to(device))[..., :vocab].float()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        theirs = hf(tokens.to(device)).logits[..., :vocab].float()
    print(json.dumps({"device": str(device), "logits_shape": list(theirs.shape),
                      "max_abs_logit_diff": float((ours - theirs).abs().max()),
                      "same_argmax": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
                      "tolerance": TOLERANCE}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
