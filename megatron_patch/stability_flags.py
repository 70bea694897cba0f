"""This package's stabilization flags (Spike No More, WeSaR, z-loss), as an argparse group.

Kept apart from megatron_patch.config, which subclasses megatron-core's TransformerConfig, so that
building the parser (`pretrain_gpt.py --help`, a flag error) does not import megatron-core.
`megatron_patch.config.stability_kwargs` turns the parsed flags into StabilityConfig fields.
"""

import argparse


def add_stability_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The new flags of this package, in their own --help group."""
    g = parser.add_argument_group(
        "stabilization (Spike No More, WeSaR)",
        "Loss-spike fixes; all off by default (then the model equals stock megatron-core).",
    )
    g.add_argument("--scaled-embed", action="store_true",
                   help="Scaled Embed: multiply the embedding output by sqrt(hidden size).")
    g.add_argument("--embed-layernorm", action="store_true",
                   help="Embed LN: LayerNorm on the embedding output before the first layer.")
    g.add_argument("--embed-detach-alpha", type=float, nargs="?", const=0.1, default=None,
                   metavar="G", help="Embed Detach: shrink the embedding gradient by G (default 0.1).")
    g.add_argument("--init-style", choices=["scaled", "xavier", "plain"], default="scaled",
                   help="scaled (upstream): W_O, W_2 at sigma/sqrt(2N); xavier (SNM v4's name; plain is "
                        "an alias): every matrix at sigma.")
    g.add_argument("--small-init", action="store_true",
                   help="sigma = sqrt(2/(5*hidden size)) instead of --init-method-std.")
    g.add_argument("--wesar", action="store_true",
                   help="WeSaR: trainable scalar gate per weight matrix, W_bar = alpha * W.")
    g.add_argument("--wesar-init-std", type=float, default=None,
                   help="Common init std of every gated matrix (default: the paper's sigma^2 = 4e-5, "
                        "sigma = 0.0063; the spike study found it needs a large batch: at batch 8 "
                        "the init std did better).")
    g.add_argument("--wesar-targets", choices=["init", "he"], default="init",
                   help="Stds the gated matrices start at: init (this model's init scheme) or he "
                        "(He init with residual scaling, the WeSaR paper's backbone [unverified]).")
    g.add_argument("--wesar-fused-qkv-gate", action="store_true",
                   help="One WeSaR gate for the fused QKV matrix instead of three (W_q, W_k, W_v).")
    g.add_argument("--wesar-no-output-gate", action="store_true",
                   help="Do not gate the untied prediction head (gated by default under --wesar).")
    g.add_argument("--wesar-gate-side", choices=["auto", "weight", "activation"], default="auto",
                   help="Where the gate multiplies (same function): weight (alpha*W, local linears), "
                        "activation (the linear's output or input; TE linears), auto: weight where possible.")
    g.add_argument("--wesar-embedding-common-std", action="store_true",
                   help="Initialise the embedding at WeSaR's common std (gate 1).")
    g.add_argument("--z-loss-coeff", type=float, default=0.0, metavar="C",
                   help="z-loss: add C * (log Z)^2 per token, Z the softmax normaliser of the logits "
                        "(PaLM, OLMo; e.g. 1e-4). Logged apart as 'z loss'. 0: off.")
    g.add_argument("--no-embedding-weight-decay", action="store_true",
                   help="Exclude the embedding tables from weight decay.")
    return parser
