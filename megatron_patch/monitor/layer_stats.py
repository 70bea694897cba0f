"""Per-layer quantities of [SNM]'s analysis, captured with forward hooks on the layer norms.

For every Transformer layer i we look at the two pre-LNs (`input_layernorm` before attention,
`pre_mlp_layernorm` before the FFN):
  - sigma_x: std of the LN input over the hidden dimension (mean over tokens). [SNM v2] Eq. 9-10
    (v4: Eq. 12-14 [unverified]):
    the LN Jacobian norm is proportional to 1/sigma_x, so sigma_x << 1 amplifies gradients.
  - gain: ||J_LN^T g|| / ||g||, the measured gradient amplification through that LN for the
    actual upstream gradient g = dL/d(LN output).
Works on a model chunk of any pipeline stage; TP ranks see the same LN inputs unless sequence
parallelism splits the sequence, in which case each rank reports its own slice.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import torch

LN_NAMES = ("input_layernorm", "pre_mlp_layernorm")


@dataclass
class LayerNormProbe:
    """Keeps (input, output) of one LN from the last forward, with the graph between them."""

    name: str
    inputs: List[torch.Tensor] = field(default_factory=list)
    outputs: List[torch.Tensor] = field(default_factory=list)

    def hook(self, module, args, output):
        if torch.is_grad_enabled() and args[0].requires_grad:
            output.retain_grad()
        self.inputs.append(args[0])
        self.outputs.append(output)

    def input_std(self) -> float:
        x = torch.cat([t.detach().float().flatten(0, -2) for t in self.inputs])
        return x.std(dim=-1, unbiased=False).mean().item()

    def gradient_gain(self) -> float:
        """||J^T g|| / ||g|| through the LN alone (call after backward)."""
        num = den = 0.0
        for x, y in zip(self.inputs, self.outputs):
            if y.grad is None:
                continue
            (gx,) = torch.autograd.grad(y, x, grad_outputs=y.grad, retain_graph=True)
            num += gx.float().pow(2).sum().item()
            den += y.grad.float().pow(2).sum().item()
        return (num / den) ** 0.5 if den > 0 else float("nan")


class LayerNormProbes:
    """Context manager attaching a probe to every pre-LN of the model's Transformer layers."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.probes: Dict[str, LayerNormProbe] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            if name.rsplit(".", 1)[-1] in LN_NAMES and "layers." in name:
                probe = LayerNormProbe(name)
                self.probes[name] = probe
                self._handles.append(module.register_forward_hook(probe.hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def layer_index(name: str) -> int:
    """'decoder.layers.3.input_layernorm' -> 3 (local index within the model chunk)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])
