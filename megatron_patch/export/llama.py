"""Megatron GPTModel <-> Hugging Face LlamaForCausalLM: RMSNorm, SwiGLU, RoPE, GQA, biases or none.

Layouts (megatron-core's local layers):
  - Fused QKV rows are grouped per query group g: [q heads of g (heads/groups * hn rows), k_g (hn),
    v_g (hn)], g = 0..groups-1. Llama has separate q/k/v projections, and its query head i reads
    key/value head i // (heads/groups) (repeat_kv), which is megatron's grouping.
  - SwiGLU's fused fc1 is [gate; up] (megatron-core's glu: silu(first half) * second half);
    Llama: down(silu(gate(x)) * up(x)).
  - RoPE: megatron's default rotates halves ([x1, x2] -> [-x2, x1], cos/sin = cat(freqs, freqs)),
    the same as Llama's rotate_half; inv_freq = 1 / base^(2i/d) in both. An interleaved-rotary
    model (pairs (2i, 2i+1)) is the same function once each q/k head's rows are reordered
    [0, 2, 4, ..., 1, 3, 5, ...] (both q and k, so q.k is unchanged): that is what export does.
    Llama 5.x rotates the whole head (its default RoPE ignores partial_rotary_factor), so
    --rotary-percent < 1 is refused.
Folds (exact): WeSaR via megatron_patch.wesar.plain_state_dict; Scaled Embed: sqrt(d) into the
embedding table, the output layer untied and keeping the raw table.
"""

import torch

from .hf import source_state, with_embedding_and_head

SUFFIXES = [  # (megatron suffix in decoder.layers.{i}., llama suffix in model.layers.{i}.)
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("self_attention.linear_proj.bias", "self_attn.o_proj.bias"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ("mlp.linear_fc2.bias", "mlp.down_proj.bias"),
]


def unsupported_options(config, args) -> list:
    """Flags of this model that LlamaForCausalLM cannot represent (empty when it exports)."""
    checks = [
        (f"--normalization {config.normalization} (Llama uses RMSNorm)", config.normalization != "RMSNorm"),
        ("no --swiglu (Llama's MLP is SwiGLU)", not config.gated_linear_unit),
        (f"--position-embedding-type {args.position_embedding_type} (Llama uses rope)",
         args.position_embedding_type != "rope"),
        (f"--rotary-percent {args.rotary_percent} (Llama rotates the whole head)",
         args.position_embedding_type == "rope" and args.rotary_percent != 1.0),
        ("--qk-layernorm (Llama has no query/key norm)", config.qk_layernorm),
        ("--apply-residual-connection-post-layernorm", config.apply_residual_connection_post_layernorm),
        ("a QKV bias without the other biases (Llama's attention_bias covers q, k, v and o)",
         config.add_qkv_bias and not config.add_bias_linear),
        ("a softmax scale other than 1/sqrt(kv channels)", config.softmax_scale is not None),
    ]
    return [name for name, bad in checks if bad]


def llama_config(config, args, common, tied: bool, extra=None):
    """transformers.LlamaConfig for this model (vocabulary = the padded size)."""
    from transformers import LlamaConfig

    eod = int(common.get("eod", common["vocab_size"] - 1))
    hf = LlamaConfig(
        vocab_size=common["padded_vocab_size"], hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels, hidden_act="silu", max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rotary_base)},
        attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear,
        attention_dropout=config.attention_dropout, bos_token_id=eod, eos_token_id=eod, pad_token_id=None,
    )
    hf.megatron_patch = dict(vocab_size=int(common["vocab_size"]), iteration=int(common.get("iteration", 0)),
                             args=dict(common["args"]), **(extra or {}))
    return hf


def _interleaved_to_half(rows: torch.Tensor, hn: int) -> torch.Tensor:
    """[n*hn, ...] rows of n heads, each reordered [0, 2, ..., hn-2, 1, 3, ..., hn-1]."""
    order = torch.cat([torch.arange(0, hn, 2), torch.arange(1, hn, 2)])
    return rows.reshape(-1, hn, *rows.shape[1:])[:, order].reshape(rows.shape)


def _split_qkv(t, heads, groups):
    """Fused [groups*(heads/groups + 2)*hn, ...] -> (q [heads*hn, ...], k, v [groups*hn, ...])."""
    per = heads // groups
    hn = t.shape[0] // (groups * (per + 2))
    t = t.reshape(groups, per + 2, hn, *t.shape[1:])
    rest = t.shape[3:]
    return (t[:, :per].reshape(heads * hn, *rest), t[:, per].reshape(groups * hn, *rest),
            t[:, per + 1].reshape(groups * hn, *rest))


def _fuse_qkv(q, k, v, heads, groups):
    per, hn = heads // groups, k.shape[0] // groups
    rest = q.shape[1:]
    parts = [q.reshape(groups, per, hn, *rest), k.reshape(groups, 1, hn, *rest), v.reshape(groups, 1, hn, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def megatron_to_llama_state(model, config):
    """(Llama state dict, tied) from a whole (TP=1, PP=1) GPTModel; folds WeSaR and Scaled Embed,
    and reorders an interleaved-rotary model's q/k rows to Llama's rotate_half."""
    src = source_state(model)
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    hn = config.kv_channels
    out = {}
    for i in range(config.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ms, hs in SUFFIXES:
            if m + ms in src:
                out[h + hs] = src[m + ms]
        for kind in ("weight", "bias"):
            fused = src.get(f"{m}self_attention.linear_qkv.{kind}")
            if fused is None:
                continue
            q, k, v = _split_qkv(fused, heads, groups)
            if config.rotary_interleaved:
                q, k = _interleaved_to_half(q, hn), _interleaved_to_half(k, hn)
            for name, t in zip("qkv", (q, k, v)):
                out[f"{h}self_attn.{name}_proj.{kind}"] = t.contiguous()
            gate, up = src[f"{m}mlp.linear_fc1.{kind}"].chunk(2, dim=0)
            out[f"{h}mlp.gate_proj.{kind}"], out[f"{h}mlp.up_proj.{kind}"] = gate.contiguous(), up.contiguous()
    out["model.norm.weight"] = src["decoder.final_layernorm.weight"]
    word = src["embedding.word_embeddings.weight"]
    tied = model.share_embeddings_and_output_weights
    head = word if tied else src["output_layer.weight"]
    if config.scaled_embed:  # sqrt(d) * word: folded into the table, the head keeps the raw one
        word, tied = word * config.hidden_size ** 0.5, False
    out["model.embed_tokens.weight"] = word
    if not tied:
        out["lm_head.weight"] = head.clone()
    return out, tied


def llama_to_megatron_state(hf_state, template: dict, num_layers: int, heads: int, groups: int):
    """Megatron state dict (keys of `template`, a plain half-split-rotary model's state_dict)."""
    out = {}
    for i in range(num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ms, hs in SUFFIXES:
            if m + ms in template:
                out[m + ms] = hf_state[h + hs]
        for kind in ("weight", "bias"):
            if f"{m}self_attention.linear_qkv.{kind}" not in template:
                continue
            q, k, v = (hf_state[f"{h}self_attn.{n}_proj.{kind}"] for n in "qkv")
            out[f"{m}self_attention.linear_qkv.{kind}"] = _fuse_qkv(q, k, v, heads, groups)
            out[f"{m}mlp.linear_fc1.{kind}"] = torch.cat([hf_state[f"{h}mlp.gate_proj.{kind}"],
                                                          hf_state[f"{h}mlp.up_proj.{kind}"]])
    out["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"]
    return with_embedding_and_head(out, hf_state, template, "model.embed_tokens.weight")


def args_from_llama_config(hf) -> dict:
    """Trainer flags for a Llama config that did not come from this package."""
    groups = hf.num_key_value_heads or hf.num_attention_heads
    return dict(num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                num_attention_heads=hf.num_attention_heads, ffn_hidden_size=hf.intermediate_size,
                kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                group_query_attention=groups != hf.num_attention_heads, num_query_groups=groups,
                normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                rotary_base=int(hf.rope_parameters["rope_theta"]), rotary_percent=1.0,
                disable_bias_linear=not hf.attention_bias, max_position_embeddings=hf.max_position_embeddings,
                seq_length=hf.max_position_embeddings, norm_epsilon=hf.rms_norm_eps,
                hidden_dropout=0.0, attention_dropout=hf.attention_dropout,
                tokenizer_type="NullTokenizer", vocab_size=hf.vocab_size - 1)


def import_problems(hf) -> list:
    """What in a LlamaConfig the trainer cannot build (empty when it imports)."""
    rope = hf.rope_parameters or {}
    theta = rope.get("rope_theta")
    checks = [
        (f"hidden_act {hf.hidden_act!r} (the trainer's SwiGLU is silu)", hf.hidden_act != "silu"),
        (f"rope_type {rope.get('rope_type')!r} (the trainer has plain RoPE)", rope.get("rope_type") != "default"),
        (f"rope_theta {theta} (--rotary-base takes an integer)", theta is None or float(theta) != int(theta)),
        ("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0) not in (None, 1.0)),
        ("attention_bias != mlp_bias (--disable-bias-linear covers both)", hf.attention_bias != hf.mlp_bias),
    ]
    return [name for name, bad in checks if bad]
