"""Why will my run spike? [SNM]'s per-layer quantities at initialisation, per stabilization option.

[SNM v4]'s two conditions for a stable start: *small sub-layers* (the FFN and attention bounds
below stay near 1) and a *large shortcut* (sigma_x, the residual stream's std, not tiny, so the
LN Jacobian ~ (1/sigma_x) I does not amplify gradients).

Builds the model given by the flags (Megatron-LM names; a small default model without flags) at
init on CPU, once as configured and once per stabilization option, runs one batch of random
tokens through it and prints per layer:
  sigma_x    std of the attention LN input (the residual stream entering layer i)
  1/sigma_x  the LN Jacobian factor [SNM v2] Eq. 9-10 predicts (v4: Eq. 12-14 [unverified])
  gain       measured ||J_LN^T g|| / ||g|| through that LN
  sigma_x'   std of the FFN LN input
  ffn bound  [SNM]'s FFN bound (v4: Eq. 15 [unverified]) on ||dy/dx||:
             1 + sigma1*sigma2/sigma_x' * (sqrt(d) + sqrt(d_ffn))^2
  |g qkv|, |g fc1|  gradient norms of the layer's QKV and fc1 weights
and flags layers whose predicted LN factor says gradients will be amplified (1/sigma_x > 10).

    python tools/stability_report.py [--num-layers 8 --hidden-size 512 ...] [--scaled-embed ...]
"""

import argparse
import math
import sys

import torch

from megatron_patch.config import StabilityConfig, StabilityConfigError, stability_kwargs
from megatron_patch.monitor.layer_stats import LayerNormProbes, layer_index
from megatron_patch.stability_flags import add_stability_args

AMPLIFIED = 10.0
VARIANTS = {
    "vanilla": {},
    "xavier_init": dict(init_style="xavier"),  # [SNM v4]'s name for no depth scaling
    "sigma1_embedding": dict(embedding_init_method_std=1.0),  # [SNM v4]: also meets the condition
    "embed_detach": dict(embed_detach_alpha=0.1),
    "embed_layernorm": dict(embed_layernorm=True),
    "scaled_embed": dict(scaled_embed=True),
    "wesar": dict(wesar=True),
    "qk_layernorm": dict(qk_layernorm=True),  # megatron-core's QK-norm (OLMo-core's, peers')
}
NO_FIX = dict(scaled_embed=False, embed_layernorm=False, embed_detach_alpha=None, wesar=False,
              wesar_init_std=None, init_style="scaled", qk_layernorm=False, z_loss_coeff=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("model (Megatron-LM names)")
    g.add_argument("--num-layers", type=int, default=8)
    g.add_argument("--hidden-size", type=int, default=512)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=8)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--vocab-size", type=int, default=2048)
    g.add_argument("--init-method-std", type=float, default=None)
    g.add_argument("--embedding-init-method-std", type=float, default=None)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--only-configured", action="store_true", help="report only the configured model")
    g.add_argument("--qk-layernorm", action="store_true", help="LayerNorm on queries and keys (megatron-core).")
    add_stability_args(p)
    return p.parse_args(argv)


def measure(args, options: dict):
    """Per-layer rows for one variant: list of dicts, one per Transformer layer."""
    from megatron_patch.model import build_gpt_model

    torch.manual_seed(args.seed)
    cfg = StabilityConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, normalization=args.normalization,
        init_method_std=args.init_method_std or 0.02, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, **{"embedding_init_method_std": args.embedding_init_method_std, **options})
    model = build_gpt_model(cfg, args.vocab_size, args.seq_length, transformer_impl="local")
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=g)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(args.seq_length).expand_as(tokens)
    with LayerNormProbes(model) as probes:
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward(retain_graph=True)
        rows = {}
        for name, probe in probes.probes.items():
            row = rows.setdefault(layer_index(name), {})
            key = "attn" if name.endswith("input_layernorm") else "ffn"
            row[f"{key}_std"], row[f"{key}_gain"] = probe.input_std(), probe.gradient_gain()
    d, d_ffn = cfg.hidden_size, cfg.ffn_hidden_size
    for i, layer in enumerate(model.decoder.layers):
        mlp, attn = layer.mlp, layer.self_attention
        sigma1, sigma2 = (_effective(mlp.linear_fc1).std().item(), _effective(mlp.linear_fc2).std().item())
        row = rows[i]
        row["ffn_bound"] = 1 + sigma1 * sigma2 / row["ffn_std"] * (math.sqrt(d) + math.sqrt(d_ffn)) ** 2
        row["g_qkv"] = attn.linear_qkv.weight.grad.norm().item()
        row["g_fc1"] = mlp.linear_fc1.weight.grad.norm().item()
    return loss.item(), [rows[i] for i in sorted(rows)]


def _effective(linear):
    """W_bar = alpha * W under WeSaR (per Q/K/V row block), else W."""
    folded = getattr(linear, "folded_weight", None)
    return (folded() if folded is not None else linear.weight).detach()


def print_variant(name, loss, rows):
    print(f"\n== {name}  (loss at init {loss:.4f})")
    print(f"{'layer':>5} {'sigma_x':>8} {'1/sigma_x':>9} {'gain':>8} {'sigma_x2':>8} {'ffn bound':>10}"
          f" {'|g qkv|':>9} {'|g fc1|':>9}")
    for i, r in enumerate(rows):
        flag = "  <- LN amplifies gradients" if 1 / r["attn_std"] > AMPLIFIED else ""
        print(f"{i:>5} {r['attn_std']:>8.4f} {1 / r['attn_std']:>9.2f} {r['attn_gain']:>8.2f}"
              f" {r['ffn_std']:>8.4f} {r['ffn_bound']:>10.2f} {r['g_qkv']:>9.2e} {r['g_fc1']:>9.2e}{flag}")


def main(argv=None):
    args = parse_args(argv)
    try:
        configured = {**stability_kwargs(args), "qk_layernorm": args.qk_layernorm}
        StabilityConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                        num_attention_heads=args.num_attention_heads, **configured)
    except StabilityConfigError as e:
        sys.exit(f"error: {e}")
    from megatron_patch.training.initialize import init_single_process

    init_single_process(args.seed)
    defaults = {**stability_kwargs(parse_args([])), "qk_layernorm": False}
    base = {k: v for k, v in configured.items() if k not in NO_FIX}
    variants = {"configured": configured}
    if not args.only_configured:
        variants.update({n: {**base, **NO_FIX, **v} for n, v in VARIANTS.items()})
        same = next((n for n, v in variants.items() if n != "configured" and v == configured), None)
        if same is not None:  # measured once, under the variant's name
            del variants["configured"]
            print(f"the configured model is the '{same}' variant")
    print(f"model: {args.num_layers} layers, d={args.hidden_size}, heads={args.num_attention_heads}, "
          f"seq={args.seq_length}, batch={args.micro_batch_size}, vocab={args.vocab_size}; "
          f"configured options: {({k: v for k, v in configured.items() if v != defaults.get(k)}) or 'none'}")
    summary = []
    for name, options in variants.items():
        loss, rows = measure(args, options)
        print_variant(name, loss, rows)
        shallow, deep = rows[0]["g_qkv"], rows[-1]["g_qkv"]
        summary.append((name, rows[0]["attn_std"], max(r["attn_gain"] for r in rows), shallow / deep,
                        sum(1 / r["attn_std"] > AMPLIFIED for r in rows)))
    print(f"\n== summary\n{'variant':<16} {'sigma_x L0':>10} {'max LN gain':>11} {'|g qkv| L0/Llast':>16} "
          f"{'amplifying LNs':>14}")
    for name, s0, gain, ratio, n in summary:
        print(f"{name:<16} {s0:>10.4f} {gain:>11.2f} {ratio:>16.2f} {n:>14}")


if __name__ == "__main__":
    main()
