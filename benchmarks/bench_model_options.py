"""Forward+backward tokens/s of stock megatron-core GPTModel vs each stabilization option (CPU).

All variants are built with the same shape and timed interleaved (variant order rotates every
round) in one process, so machine drift hits them alike; the median over rounds is reported with
its ratio to stock. Also prints parameter counts: the options add only scalars / one norm, never a
copy of a weight.

    python -m benchmarks.bench_model_options [--layers 6 --hidden 256 --seq 256 --batch 8 --rounds 7]
"""

import argparse
import statistics
import time

import torch


VARIANTS = {
    "stock": None,
    "scaled_embed": dict(scaled_embed=True),
    "embed_detach": dict(embed_detach_alpha=0.1),
    "embed_layernorm": dict(embed_layernorm=True),
    "wesar": dict(wesar=True),                          # Q/K/V gates + gated head
    "wesar_fused_qkv": dict(wesar=True, wesar_fused_qkv_gate=True),
    "wesar_activation": dict(wesar=True, wesar_gate_side="activation"),  # how TE linears are gated
    "plain_init": dict(init_style="plain"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    from megatron_patch.training.initialize import init_single_process

    init_single_process(seed=0)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patch.config import StabilityConfig
    from megatron_patch.model import build_gpt_model

    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    models = {}
    for name, options in VARIANTS.items():
        torch.manual_seed(0)
        if options is None:
            models[name] = GPTModel(TransformerConfig(**shape), get_gpt_layer_local_spec(), args.vocab, args.seq)
        else:
            models[name] = build_gpt_model(StabilityConfig(**shape, **options), args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    pos = torch.arange(args.seq).expand(args.batch, args.seq)

    def step(model):
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for model in models.values():  # warm-up
        step(model)
    times = {name: [] for name in models}
    names = list(models)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            step(models[name])
            times[name].append(time.perf_counter() - start)

    tokens = args.batch * args.seq
    base = statistics.median(times["stock"])
    n_stock = sum(p.numel() for p in models["stock"].parameters())
    print(f"shape: {args.layers} layers, d={args.hidden}, seq={args.seq}, batch={args.batch}, "
          f"vocab={args.vocab}, {args.rounds} rounds, torch threads={torch.get_num_threads()}")
    # plain_init is compute-identical to stock: its ratio shows the noise of the measurement.
    print(f"{'variant':<18}{'tokens/s':>10}{'ratio':>8}{'slowdown':>10}{'params':>12}{'extra':>8}")
    for name in names:
        med = statistics.median(times[name])
        n = sum(p.numel() for p in models[name].parameters())
        print(f"{name:<18}{tokens / med:>10.0f}{base / med:>8.3f}{(med / base - 1) * 100:>9.1f}%"
              f"{n:>12}{n - n_stock:>8}")


if __name__ == "__main__":
    main()
