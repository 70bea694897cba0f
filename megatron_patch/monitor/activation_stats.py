"""Std of the residual stream where each pre-LN reads it, per layer, during a training step.

In a pre-LN Transformer the input of `input_layernorm` is the residual stream entering layer i
and the input of `pre_mlp_layernorm` the stream after its attention; [SNM]'s analysis is about
exactly these stds (the LN Jacobian is proportional to 1/std). The final norm's input closes the
picture. Hooks are attached only while a step is being measured.

Reduction: each rank sums per-token variances and token counts into one fixed vector; a sum over
the model-parallel group completes it (PP stages hold different layers; TP ranks hold the same
tokens, or disjoint sequence slices under sequence parallelism, and the mean works either way).
"""

from typing import Dict, List, Sequence, Tuple

import torch

POINTS = ("attn_ln_in", "ffn_ln_in")


def activation_keys(num_layers: int) -> List[Tuple]:
    return [(layer, p) for layer in range(1, num_layers + 1) for p in POINTS] + [(None, "final_ln_in")]


class ActivationStats:
    """with ActivationStats(chunks, num_layers) as stats: <forward>; then stats.result()."""

    def __init__(self, chunks: Sequence[torch.nn.Module], num_layers: int):
        self.chunks, self.keys = chunks, activation_keys(num_layers)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.sums = torch.zeros(len(self.keys), 2, dtype=torch.float64)  # (sum of var, tokens)
        self._handles = []

    def _hook(self, key):
        def record(module, args):
            x = args[0].detach().float()
            var = x.var(dim=-1, unbiased=False)
            self.sums[self.index[key], 0] += var.sum().item()
            self.sums[self.index[key], 1] += var.numel()
        return record

    def __enter__(self):
        for chunk in self.chunks:
            for name, module in chunk.named_modules():
                leaf = name.rsplit(".", 1)[-1]
                owner = name.rsplit(".", 1)[0]
                if leaf in ("input_layernorm", "pre_mlp_layernorm"):
                    layer = chunk.get_submodule(owner).layer_number
                    point = "attn_ln_in" if leaf == "input_layernorm" else "ffn_ln_in"
                    self._handles.append(module.register_forward_pre_hook(self._hook((layer, point))))
                elif leaf == "final_layernorm":
                    self._handles.append(module.register_forward_pre_hook(self._hook((None, "final_ln_in"))))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> Dict[Tuple, float]:
        """{key: std} over everything seen, complete on every rank (collective call)."""
        from megatron.core import parallel_state

        sums = self.sums
        if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
            device = next(self.chunks[0].parameters()).device
            sums = sums.to(device)
            torch.distributed.all_reduce(sums, group=parallel_state.get_model_parallel_group())
            sums = sums.cpu()
        return {k: (sums[i, 0] / sums[i, 1]).sqrt().item() if sums[i, 1] > 0 else float("nan")
                for i, k in enumerate(self.keys)}
