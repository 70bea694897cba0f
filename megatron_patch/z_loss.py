"""z-loss: a penalty C * (log Z)^2 on the LM head's logits, Z = sum_v exp(logit_v) (PaLM §5;
OLMo's `z_loss_multiplier`; the latest Spike No More version advises adding it). It keeps the
softmax normaliser near 1, so the logits cannot drift to large values that make the loss
spike.

Under tensor parallelism the logits are split over the vocabulary (megatron-core's
vocab-parallel output layer): log Z is a logsumexp over all TP ranks' shards. Each rank shifts by
the global max (an all-reduce MAX, no gradient needed: logsumexp does not depend on the shift),
sums its exp, and megatron-core's `reduce_from_tensor_model_parallel_region` all-reduces the sum
(its backward is the identity: each rank's partial sum enters the total with weight 1), so the
gradient reaching each rank's logits is exactly C * 2 log Z * softmax over its shard. Padded
vocabulary rows count, as in megatron-core's cross-entropy, whose normaliser this is.

`attach_z_loss` adds the penalty to the per-token loss the model returns (what the schedules
back-propagate) and keeps the per-token penalty on the model (`z_loss_per_token`, detached)
so that the trainer reports the cross-entropy and the z-loss apart.
"""

import torch


def vocab_parallel_log_z(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(logits[..., v]) over the whole (TP-split) vocabulary, in fp32."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    shift = logits.detach().max(dim=-1, keepdim=True).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    partial = torch.exp(logits - shift).sum(dim=-1)
    total = reduce_from_tensor_model_parallel_region(partial)
    return torch.log(total) + shift.squeeze(-1)


def attach_z_loss(model, coeff: float) -> None:
    """Make `model` (a GPTModel with an output layer) add coeff * (log Z)^2 to its per-token loss."""
    language_model_loss = model.compute_language_model_loss

    def with_z_loss(labels, logits):  # logits [s, b, v/TP], loss [b, s]
        # First: megatron-core's vocab-parallel cross-entropy overwrites its logits in place.
        penalty = coeff * vocab_parallel_log_z(logits).square().transpose(0, 1)
        model.z_loss_per_token = penalty.detach()
        return language_model_loss(labels, logits) + penalty

    model.compute_language_model_loss = with_z_loss
    model.z_loss_per_token = None
