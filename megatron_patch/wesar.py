"""[WeSaR] weight scaling as reparameterization: W_bar = alpha * W with a trainable scalar alpha.

The gate is applied to the linear's input or output, never to W: (alpha * W) x = alpha * (W x)
= W (alpha * x), with the bias outside the gate (alpha * (W x) + b). That is the same function as
the paper's W_bar with no copy of W, so it wraps any linear layer whatever computes W x:
megatron-core's Column/RowParallelLinear, or
Transformer Engine's fused ones (`TELayerNormColumnParallelLinear`, `TERowParallelLinear`), with
gradient-accumulation fusion too (the linear's weight gradient is then alpha * dL/d(W_bar x)
outer x = dL/dW, written to main_grad by the linear itself).

Which gates ([WeSaR] §3: one per weight matrix; the Q/K/V split and the gated head are from
secondary summaries and YuLan-Mini's public model code, [unverified]):
  - attention: W_q, W_k, W_v (three scalars on the fused QKV output's row blocks, or one for the
    fused matrix with `wesar_fused_qkv_gate`), W_O;
  - FFN: W_1 (fc1; with SwiGLU the fused [gate; up] matrix), W_2 (fc2);
  - the prediction head when it is untied from the embedding (`wesar_gate_output_layer`).
The embedding is never gated ([WeSaR]: gate 1); `wesar_embedding_common_std` puts it at the
common std instead of its own.

Tensor parallelism: alpha is replicated on every TP rank. dL/dalpha = sum(t * dL/dt) over the
whole tensor t the gate scales; where this rank holds only part of t the per-rank sums are added
over the TP group (`copy_to_tensor_model_parallel_region`: identity forward, all-reduce
backward), inside autograd. Part of t lives here for a column-parallel output (each rank owns
whole output columns, hence whole query groups of QKV) unless gathered, and for a row-parallel
input (split along the hidden dim). A column-parallel input and a row-parallel output are whole
on every rank (with the same gradient) except under sequence parallelism, whose sequence shards
are partial again.
"""

import math

import torch
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.utils import init_method_normal

_GATED_CLASSES = {}


class _Scale(torch.autograd.Function):
    """z = scale * y (+ bias), per row block of the last dim when `blocks` is given.

    Saves its output z, not y: downstream ops keep z anyway (attention's q/k/v are views of it,
    the activation saves its input, the next linear saves its input) and y is freed on return, so
    the gate adds no activation memory, where autograd's own scale * y would keep y alive for
    backward. y = (z - bias) / scale recovers what dL/dscale = sum(dL/dz * y) needs. The gates
    start at target/common > 0; a gate trained to exactly 0 would make its gradient non-finite
    (loudly: the NaN checks and the spike monitor see it)."""

    @staticmethod
    def forward(ctx, y, scale, bias, blocks):
        ctx.blocks, ctx.has_bias = blocks, bias is not None
        z = y * scale if blocks is None else (y.view(-1, *blocks) * scale).view_as(y)
        if bias is not None:
            z = z.add_(bias)
        ctx.save_for_backward(z, scale, bias)
        return z

    @staticmethod
    def backward(ctx, grad):
        z, scale, bias = ctx.saved_tensors
        y_times_scale = z - bias if ctx.has_bias else z
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        if ctx.blocks is None:
            grad_scale = (grad * y_times_scale).sum(dtype=torch.float32).reshape(1) / scale.float()
            return grad * scale, grad_scale.to(scale.dtype), grad_bias, None
        shaped = grad.reshape(-1, *ctx.blocks)
        grad_scale = (shaped * y_times_scale.view(-1, *ctx.blocks)).sum(dim=(0, 2), dtype=torch.float32)
        grad_scale = (grad_scale.unsqueeze(-1) / scale.float()).to(scale.dtype)
        return (shaped * scale).view_as(grad), grad_scale, grad_bias, None


def target_stds(config) -> dict:
    """The std each gated matrix's W_bar = alpha * W starts at (docs/wesar.md has the table).

    "init": what this model's init scheme gives the plain matrix: sigma (init_method_std, or
    sqrt(2/(5d)) with small init) for W_q, W_k, W_v, W_1 and the head; W_O and W_2 at
    sigma/sqrt(2N) under scaled init ([SNM] §3.1), sigma under Xavier init.
    "he": He init, sqrt(2/fan_in), with residual scaling 1/sqrt(2N) on W_O and W_2 (dropped under
    Xavier init, which asks for no depth scaling) [unverified]."""
    depth = 1.0 if config.init_style in ("xavier", "plain") else 1.0 / math.sqrt(2.0 * config.num_layers)
    if config.wesar_targets == "init":
        sigma = config.init_method_std
        return dict(qkv=sigma, proj=config.output_layer_target_std, fc1=sigma,
                    fc2=config.output_layer_target_std, head=sigma)
    d = config.hidden_size
    he = lambda fan_in: math.sqrt(2.0 / fan_in)  # noqa: E731
    return dict(qkv=he(d), proj=he(config.kv_channels * config.num_attention_heads) * depth,
                fc1=he(d), fc2=he(config.ffn_hidden_size) * depth, head=he(d))


def gate_side(base: type, config, parallel_mode: str) -> str:
    """Where a layer's gate is applied: "weight" (alpha * W into the matmul; the cheapest, one
    weight-sized temporary) for megatron-core's own linears without gradient-accumulation fusion;
    otherwise "output" for column-parallel layers (QKV, whose three gates need the output's row
    blocks; fc1, whose input may be normalised inside TE's fused LayerNorm-linear) and "input" for
    row-parallel ones (W_O, W_2). `wesar_gate_side="activation"` forces the latter two, which is
    how Transformer Engine's linears are gated, so CPU tests run that code path too."""
    can_weight = hasattr(base, "_forward_impl") and not config.gradient_accumulation_fusion
    if config.wesar_gate_side == "weight" and not can_weight:
        raise ValueError("wesar_gate_side='weight' needs megatron-core's local linears without "
                         "gradient-accumulation fusion (Transformer Engine's linear reads its own weight)")
    if can_weight and config.wesar_gate_side != "activation":
        return "weight"
    return "output" if parallel_mode == "column" else "input"


class _WeSaRGate:
    """Mixin over a linear layer class: adds `wesar_gate` and applies it where `gate_side` says:
    on the weight, alpha * W; or on the output, alpha * (W x) + b, with the bias taken apart from
    the linear and added after the gate; or on the input, W (alpha * x) + b (for W_O, W_2 and the
    head the scaled input is the tensor the linear saves for its weight gradient anyway; for the
    head it is also far smaller than the logits). The activation sides add no activation memory
    (`_Scale`). The gate has shape [1], or [3] (alpha_q, alpha_k, alpha_v) for a QKV layer with
    separate gates; megatron-core's optimizer skips weight decay on 1-D parameters."""

    def __init__(self, *args, config, init_method, skip_bias_add=False, wesar_target_std,
                 wesar_parallel_mode, wesar_qkv=False, **kwargs):
        # W ~ N(0, common_std^2) for every gated matrix, whatever the init scheme ([WeSaR] §3).
        side = gate_side(type(self), config, wesar_parallel_mode)
        super().__init__(*args, config=config, init_method=init_method_normal(config.wesar_init_std),
                         skip_bias_add=True if side == "output" else skip_bias_add, **kwargs)
        self._setup_wesar_gate(config, wesar_target_std, wesar_parallel_mode, wesar_qkv, side=side,
                               adds_bias=side == "output" and not skip_bias_add)

    def _setup_wesar_gate(self, config, target_std, parallel_mode, qkv, side, adds_bias=False):
        if parallel_mode not in ("column", "row"):
            raise ValueError(f"wesar_parallel_mode must be 'column' or 'row', got {parallel_mode!r}")
        self.wesar_parallel_mode, self.wesar_side, self.wesar_adds_bias = parallel_mode, side, adds_bias
        self.wesar_sequence_parallel = bool(config.sequence_parallel)
        # (query heads per group + 2, head dim): the row blocks of one query group in megatron's
        # fused QKV layout [q_1..q_n, k, v] per group; None = one gate for the whole matrix.
        self.wesar_qkv_blocks = None
        n = 1
        if qkv and not config.wesar_fused_qkv_gate:
            groups = config.num_query_groups or config.num_attention_heads
            self.wesar_qkv_blocks = (config.num_attention_heads // groups + 2, config.kv_channels)
            n = 3
        self.wesar_gate = torch.nn.Parameter(
            torch.full((n,), target_std / config.wesar_init_std, dtype=config.params_dtype,
                       device=self.weight.device))

    def wesar_channel_scale(self) -> torch.Tensor:
        """alpha per output channel block: [1] or [blocks, 1] (broadcast over a block's head dim)."""
        gate = self.wesar_gate
        if self.wesar_qkv_blocks is None:
            return gate
        n_q = self.wesar_qkv_blocks[0] - 2
        return torch.cat([gate[:1].expand(n_q), gate[1:]]).unsqueeze(-1)

    def _wesar_scaled_is_partial(self, gathered: bool) -> bool:
        """Does this rank hold only part of the tensor the gate scales (so dL/dalpha is a
        per-rank partial sum)? The weight: yes (its TP shard). Output of a column-parallel layer:
        yes unless gathered. Input of a row-parallel layer: yes (split along the hidden dim).
        Output of a row-parallel layer and input of a column-parallel one: only under sequence
        parallelism."""
        if self.wesar_side == "weight":
            return True
        if (self.wesar_parallel_mode == "column") == (self.wesar_side == "output"):
            return not gathered
        return self.wesar_sequence_parallel

    def _wesar_tp_scale(self, gathered):
        """The gate (per channel block), with its gradient summed over TP where it is partial."""
        scale = self.wesar_channel_scale()
        if self._wesar_scaled_is_partial(gathered):
            scale = copy_to_tensor_model_parallel_region(
                scale, group=getattr(self, "tp_group", None) or getattr(self, "_tp_group", None))
        return scale

    def _wesar_scale(self, tensor, gathered=False, bias=None):
        scale = self._wesar_tp_scale(gathered)
        return _Scale.apply(tensor, scale.to(tensor.dtype), bias, self.wesar_qkv_blocks)

    def _forward_impl(self, input, weight, *args, **kwargs):
        """megatron-core's matmul (local linears only); the weight side passes alpha * W."""
        if self.wesar_side == "weight":
            weight = self._folded(weight, self._wesar_tp_scale(gathered=False))
        return super()._forward_impl(input, weight, *args, **kwargs)

    def forward(self, input_, *args, **kwargs):
        if self.wesar_side == "weight":
            return super().forward(input_, *args, **kwargs)
        if self.wesar_side == "input":
            return super().forward(self._wesar_scale(input_), *args, **kwargs)
        output, bias = super().forward(input_, *args, **kwargs)
        gathered = kwargs.get("runtime_gather_output")
        if gathered is None:
            gathered = getattr(self, "gather_output", False)
        if self.wesar_adds_bias:  # alpha * (W x) + b in one op
            return self._wesar_scale(output, gathered, bias), None
        return self._wesar_scale(output, gathered), bias

    @torch.no_grad()
    def fold_wesar_gate(self) -> None:
        """W <- alpha * W (per row block for QKV), alpha <- 1: the same function with plain
        weights. alpha * (W x) and (alpha * W) x agree up to float rounding, not bit for bit."""
        self.weight.copy_(self.folded_weight())
        self.wesar_gate.fill_(1.0)

    def folded_weight(self) -> torch.Tensor:
        """alpha * W as the plain layer's weight (rows in megatron's layout)."""
        return self._folded(self.weight, self.wesar_channel_scale())

    def _folded(self, w, scale):
        scale = scale.to(w.dtype)
        if self.wesar_qkv_blocks is None:
            return w * scale
        blocks, head_dim = self.wesar_qkv_blocks
        return (w.view(-1, blocks, head_dim, w.shape[-1]) * scale.view(1, blocks, 1, 1)).view_as(w)


def gated_class(base: type) -> type:
    """The WeSaR subclass of a linear layer class (one per base class, so isinstance and
    pickling see a stable type)."""
    if base not in _GATED_CLASSES:
        _GATED_CLASSES[base] = type(f"WeSaR{base.__name__}", (_WeSaRGate, base),
                                    {"__module__": __name__, "__doc__": f"{base.__name__} with W_bar = alpha * W."})
    return _GATED_CLASSES[base]


@torch.no_grad()
def gate_output_layer(model: torch.nn.Module, config, target_std: float) -> None:
    """Gate an untied prediction head after GPTModel built it with config.init_method:
    W <- W * common/sigma (W was drawn from N(0, sigma^2), so this is an N(0, common^2) draw from
    the same random numbers, identical on every TP layout), alpha = target / common. The head is
    gated on its input, whatever the layers use: the hidden state is far smaller than the logits
    or the vocab x d weight."""
    layer = model.output_layer
    layer.weight.mul_(config.wesar_init_std / config.init_method_std)
    layer.__class__ = gated_class(type(layer))
    layer._setup_wesar_gate(config, target_std, "column", qkv=False, side="input")


def wesar_layers(model: torch.nn.Module):
    """(name, module) of every gated linear layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _WeSaRGate)]


def fold_wesar_gates(model: torch.nn.Module) -> int:
    """Fold every alpha into its W in place; returns how many layers were folded."""
    layers = wesar_layers(model)
    for _, layer in layers:
        layer.fold_wesar_gate()
    return len(layers)


def plain_state_dict(model: torch.nn.Module) -> dict:
    """The model's state_dict with every W replaced by alpha * W and the gates dropped: loads into
    the same model built without WeSaR and gives the same outputs (up to rounding). The model is
    left unchanged."""
    state = model.state_dict()
    for name, layer in wesar_layers(model):
        prefix = f"{name}." if name else ""
        state[f"{prefix}weight"] = layer.folded_weight().detach()
        del state[f"{prefix}wesar_gate"]
    return state
