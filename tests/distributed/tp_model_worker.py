"""torchrun --nproc-per-node 2 worker: each option at TP=2 (and TP=2 + SP) equals TP=1, and so
does the model's own loss with the z-loss (a logsumexp over the vocabulary-parallel logits).

Builds the same model (CPU init, same seed) once with tensor parallelism 1 and once with 2,
runs the same batch, and compares the gathered logits, the per-token loss, and the gradients of
the new parameters (WeSaR gates: summed over TP inside autograd). Prints one line per case and
exits non-zero on the first mismatch.
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_patch.compat import cpu
from megatron_patch.config import StabilityConfig
from megatron_patch.model import build_gpt_model
from megatron_patch.training.initialize import teardown
from tests.tolerances import summation_atol

VOCAB, SEQ, BATCH = 128, 16, 2
SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
             hidden_dropout=0.0, attention_dropout=0.0)
CASES = {
    "off": {},
    "scaled_embed": dict(scaled_embed=True),
    "embed_layernorm": dict(embed_layernorm=True),
    "embed_detach": dict(embed_detach_alpha=0.1),
    "plain_small_init": dict(init_style="plain", small_init=True),
    "wesar": dict(wesar=True, wesar_init_std=0.01),  # Q/K/V gates, gated head (gathered logits)
    "wesar_fused_qkv+gqa": dict(wesar=True, wesar_init_std=0.01, wesar_fused_qkv_gate=True, num_query_groups=2),
    "wesar+gqa+he": dict(wesar=True, num_query_groups=2, wesar_targets="he"),
    "wesar_on_activations+gqa": dict(wesar=True, num_query_groups=2, wesar_gate_side="activation"),
    "embed_layernorm+sp": dict(embed_layernorm=True, sequence_parallel=True),
    "wesar+scaled_embed+sp": dict(wesar=True, scaled_embed=True, sequence_parallel=True),
    "wesar_on_activations+sp": dict(wesar=True, wesar_gate_side="activation", sequence_parallel=True),
}
LOGIT_ATOL, GRAD_RTOL = 1e-5, 1e-4


def run(tp: int, options: dict):
    teardown()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    cfg = StabilityConfig(**SHAPE, tensor_model_parallel_size=tp,
                          **{k: v for k, v in options.items() if tp > 1 or k != "sequence_parallel"})
    model = build_gpt_model(cfg, VOCAB, SEQ, parallel_output=False, share_embeddings_and_output_weights=False)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(ids, pos, None)  # [b, s, vocab], gathered over TP (parallel_output=False)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none")
    loss.mean().backward()
    gates = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("wesar_gate")}
    return logits.detach(), loss.detach(), gates


def run_z_loss(tp: int, coeff=0.05, **options):
    """The model's own loss (vocab-parallel cross-entropy + z-loss over the TP-split logits); with
    WeSaR the head's gate sees only this rank's vocabulary shard."""
    teardown()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    cfg = StabilityConfig(**SHAPE, tensor_model_parallel_size=tp, z_loss_coeff=coeff, **options)
    model = build_gpt_model(cfg, VOCAB, SEQ, share_embeddings_and_output_weights=False)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    loss = model(ids, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=ids)  # [b, s]
    loss.mean().backward()
    # Under sequence parallelism the norm's gradient is per-rank partial until megatron's
    # finalize_model_grads sums it; the gates are summed inside autograd.
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("wesar_gate")]
    if not cfg.sequence_parallel:
        grads.append(model.decoder.final_layernorm.weight.grad)
    return loss.detach(), model.z_loss_per_token, torch.cat(grads).clone()


def main():
    dist.init_process_group("gloo")
    cpu.enable()
    failures = 0
    for name, options in (("z_loss", {}), ("z_loss+wesar+sp", dict(wesar=True, sequence_parallel=True)),
                          ("z_loss+wesar_on_activations+sp", dict(wesar=True, sequence_parallel=True,
                                                                  wesar_gate_side="activation"))):
        (loss1, z1, grad1) = run_z_loss(1, **{k: v for k, v in options.items() if k != "sequence_parallel"})
        (loss2, z2, grad2) = run_z_loss(2, **options)
        if "sequence_parallel" in options:
            grad1 = grad1[:grad2.numel()]  # the TP=1 run also returned the norm's gradient
        ok = torch.allclose(loss1, loss2, atol=LOGIT_ATOL) and torch.allclose(z1, z2, atol=LOGIT_ATOL) \
            and torch.allclose(grad2, grad1, rtol=GRAD_RTOL, atol=summation_atol(grad1)) and bool(z1.min() > 0)
        if dist.get_rank() == 0:
            print(f"{'OK  ' if ok else 'FAIL'} {name}: max|loss TP1-TP2|={(loss1 - loss2).abs().max().item():.2e} "
                  f"max|grad|={(grad1 - grad2).abs().max().item():.2e}")
        failures += not ok
    for name, options in CASES.items():
        logits1, loss1, gates1 = run(1, options)
        logits2, loss2, gates2 = run(2, options)
        diff = (logits1 - logits2).abs().max().item()
        ok = diff <= LOGIT_ATOL and torch.allclose(loss1, loss2, atol=LOGIT_ATOL)
        for gate, grad in gates1.items():
            ok &= torch.allclose(gates2[gate], grad, rtol=GRAD_RTOL, atol=summation_atol(grad))
        if dist.get_rank() == 0:
            print(f"{'OK  ' if ok else 'FAIL'} {name}: max|logits TP1-TP2|={diff:.2e} gates={len(gates1)}")
        failures += not ok
    dist.barrier()
    teardown()
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
