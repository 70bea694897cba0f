"""Megatron GPTModel <-> Hugging Face GPT2LMHeadModel: tensor names, layouts and exact folds. Which
of the two export targets (GPT-2 here, Llama in llama.py) a checkpoint goes to: convert.py.

Layouts:
  - Megatron's fused QKV rows are grouped per head: [q_0, k_0, v_0, q_1, k_1, v_1, ...] (each hn
    rows); GPT-2's c_attn output columns are [q (all heads) | k | v].
  - GPT-2 uses Conv1D: weight [in, out], the transpose of a Linear weight.
Folds (exact functions, not approximations):
  - WeSaR: W <- alpha * W (the product the forward computes), gates dropped.
  - Scaled Embed: sqrt(d) * (word + pos) = sqrt(d)*word + sqrt(d)*pos, so both tables are scaled;
    the output layer then keeps the unscaled table and is untied.
  - Embed Detach changes gradients only: the forward, and so the export, is the plain model.
  - No bias (--disable-bias-linear): GPT-2 always has biases; they are exported as zeros.
Options neither GPT-2 nor Llama can compute raise ExportError naming the flag (convert.check_exportable).
"""

import math

import torch
import torch.nn.functional as F


def unsupported_options(config, args) -> list:
    """Flags of this model that GPT-2 cannot represent (empty when it exports)."""
    heads = config.num_attention_heads
    checks = [
        ("--normalization RMSNorm (GPT-2 uses LayerNorm)", config.normalization != "LayerNorm"),
        ("--swiglu (GPT-2's MLP is fc1 -> GELU -> fc2)", config.gated_linear_unit),
        ("an activation other than GELU", config.activation_func is not F.gelu),
        (f"--position-embedding-type {args.position_embedding_type} (GPT-2 has learned absolute positions)",
         args.position_embedding_type != "learned_absolute"),
        ("--group-query-attention (GPT-2 has one K/V head per query head)",
         (config.num_query_groups or heads) != heads),
        ("--kv-channels other than hidden size / heads", config.kv_channels * heads != config.hidden_size),
        ("--qk-layernorm", config.qk_layernorm),
        ("--apply-residual-connection-post-layernorm", config.apply_residual_connection_post_layernorm),
    ]
    return [name for name, bad in checks if bad]


def source_state(model) -> dict:
    """The model's tensors in plain form (WeSaR gates folded, megatron_patch.wesar.plain_state_dict),
    fp32 copies, without the `_extra_state` entries (fp8 metadata and the like)."""
    from megatron_patch.wesar import plain_state_dict  # imports megatron-core: only when exporting

    return {k: v.detach().float().clone() for k, v in plain_state_dict(model).items()
            if not k.endswith("_extra_state")}


def gpt2_config(config, args, common, tied: bool, extra=None):
    """transformers.GPT2Config for this model (vocabulary = the padded size, so every row survives)."""
    from transformers import GPT2Config

    eod = int(common.get("eod", common["vocab_size"] - 1))
    hf = GPT2Config(
        vocab_size=common["padded_vocab_size"], n_positions=args.max_position_embeddings,
        n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_attention_heads,
        # The GELU training computed: megatron's fused bias-GELU (GPU runs) is the tanh form.
        n_inner=config.ffn_hidden_size, activation_function=hf_activation(common),
        resid_pdrop=config.hidden_dropout, embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.layernorm_epsilon,
        tie_word_embeddings=tied, bos_token_id=eod, eos_token_id=eod,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
    )
    hf.megatron_patch = dict(vocab_size=int(common["vocab_size"]), iteration=int(common.get("iteration", 0)),
                             args=dict(common["args"]), **(extra or {}))
    return hf


def hf_activation(common) -> str:
    """transformers' name for the checkpoint's GELU: exact erf 'gelu', or tanh 'gelu_new'
    (checkpoints from before the activation was recorded trained on CPU: exact)."""
    return "gelu_new" if common.get("activation") == "gelu_tanh" else "gelu"


def _qkv_megatron_to_hf(weight, heads):
    """[heads*3*hn, ...] per-head [q_h; k_h; v_h] -> [3*heads*hn, ...] as [q; k; v]."""
    rest = weight.shape[1:]
    hn = weight.shape[0] // (3 * heads)
    return weight.reshape(heads, 3, hn, *rest).transpose(0, 1).reshape(3 * heads * hn, *rest)


def _qkv_hf_to_megatron(weight, heads):
    rest = weight.shape[1:]
    hn = weight.shape[0] // (3 * heads)
    return weight.reshape(3, heads, hn, *rest).transpose(0, 1).reshape(3 * heads * hn, *rest)


def _layer_map(i):
    """(megatron suffix, hf suffix, kind) for layer i; kind: 'copy', 'conv' (transpose), 'qkv'."""
    m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
    return [
        (m + "input_layernorm.weight", h + "ln_1.weight", "copy"),
        (m + "input_layernorm.bias", h + "ln_1.bias", "copy"),
        (m + "self_attention.linear_qkv.weight", h + "attn.c_attn.weight", "qkv_w"),
        (m + "self_attention.linear_qkv.bias", h + "attn.c_attn.bias", "qkv_b"),
        (m + "self_attention.linear_proj.weight", h + "attn.c_proj.weight", "conv"),
        (m + "self_attention.linear_proj.bias", h + "attn.c_proj.bias", "copy"),
        (m + "pre_mlp_layernorm.weight", h + "ln_2.weight", "copy"),
        (m + "pre_mlp_layernorm.bias", h + "ln_2.bias", "copy"),
        (m + "mlp.linear_fc1.weight", h + "mlp.c_fc.weight", "conv"),
        (m + "mlp.linear_fc1.bias", h + "mlp.c_fc.bias", "copy"),
        (m + "mlp.linear_fc2.weight", h + "mlp.c_proj.weight", "conv"),
        (m + "mlp.linear_fc2.bias", h + "mlp.c_proj.bias", "copy"),
    ]


def megatron_to_hf_state(model, config):
    """(GPT-2 state dict, tied) from a whole (TP=1, PP=1) GPTModel; folds WeSaR and Scaled Embed."""
    src = source_state(model)
    heads, h = config.num_attention_heads, config.hidden_size
    out = {}
    for i in range(config.num_layers):
        for m, hf, kind in _layer_map(i):
            t = src.get(m)
            if t is None:  # --disable-bias-linear: GPT-2 has biases, zeros are the same function
                size = 3 * h if kind == "qkv_b" else config.ffn_hidden_size if "c_fc" in hf else h
                t = torch.zeros(size)
            elif kind in ("qkv_w", "qkv_b"):
                t = _qkv_megatron_to_hf(t, heads)
            out[hf] = t.t().contiguous() if kind in ("conv", "qkv_w") else t
    out["transformer.ln_f.weight"] = src["decoder.final_layernorm.weight"]
    out["transformer.ln_f.bias"] = src["decoder.final_layernorm.bias"]
    word = src["embedding.word_embeddings.weight"]
    pos = src["embedding.position_embeddings.weight"]
    tied = model.share_embeddings_and_output_weights
    head = word if tied else src["output_layer.weight"]
    if config.scaled_embed:  # sqrt(d) * (word + pos): fold into both tables, keep the head unscaled
        scale = math.sqrt(config.hidden_size)
        word, pos, tied = word * scale, pos * scale, False
    out["transformer.wte.weight"], out["transformer.wpe.weight"] = word, pos
    if not tied:
        out["lm_head.weight"] = head.clone()
    return out, tied


def hf_to_megatron_state(hf_state, template: dict, num_layers: int, heads: int):
    """Megatron state dict (keys of `template`, a plain model's state_dict) from a GPT-2 state dict."""
    out = {}
    for i in range(num_layers):
        for m, hf, kind in _layer_map(i):
            if m not in template:
                continue
            t = hf_state[hf]
            if kind in ("conv", "qkv_w"):
                t = t.t()
            if kind in ("qkv_w", "qkv_b"):
                t = _qkv_hf_to_megatron(t, heads)
            out[m] = t.contiguous()
    out["decoder.final_layernorm.weight"] = hf_state["transformer.ln_f.weight"]
    out["decoder.final_layernorm.bias"] = hf_state["transformer.ln_f.bias"]
    out["embedding.position_embeddings.weight"] = hf_state["transformer.wpe.weight"]
    return with_embedding_and_head(out, hf_state, template, "transformer.wte.weight")


def with_embedding_and_head(out: dict, hf_state, template: dict, embed_key: str) -> dict:
    """The tail every import shares: the word embedding, an untied head from `lm_head.weight`
    (the embedding when the checkpoint ties them), and whatever else `template` holds
    (`_extra_state` entries and the like) at the template's values."""
    out["embedding.word_embeddings.weight"] = hf_state[embed_key]
    if "output_layer.weight" in template:
        out["output_layer.weight"] = hf_state.get("lm_head.weight", hf_state[embed_key])
    for key, value in template.items():
        out.setdefault(key, value)
    return out
