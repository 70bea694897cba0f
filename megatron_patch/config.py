"""Typed stabilization options on top of megatron-core's TransformerConfig.

Every field defaults to upstream behaviour: `StabilityConfig()` with no new field set builds the
exact model stock megatron-core builds. References:
  [SNM]   Takase et al., "Spike No More: Stabilizing the Pre-training of LLMs", arXiv 2312.16903.
          Equation numbers are v2's, read first-hand; v4 (COLM 2025) renumbers them (LN Jacobian
          Eq. 12-14, FFN bound Eq. 15, attention bound Eq. 20) and states the condition as *small
          sub-layers* and a *large shortcut*; the v4 numbers are second-hand [unverified].
  [WeSaR] Nishida et al., "Initialization of LLMs via Reparameterization to Mitigate Loss
          Spikes", EMNLP 2024 (arXiv 2410.05052).
"""

import argparse
import math
from dataclasses import dataclass
from typing import Literal, Optional

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal


class StabilityConfigError(ValueError):
    """A combination of options that makes no sense; the message says which and what to do."""


XAVIER = ("xavier", "plain")  # no depth scaling: SNM v4's name, and this package's earlier one
WESAR_COMMON_STD = math.sqrt(4e-5)  # [WeSaR] common sigma^2 = 4e-5 [unverified]


# The WeSaR settings that mean something only with wesar on: (field, its value when unused, the
# command-line flag that sets it). StabilityConfig and the command line refuse them without wesar.
WESAR_ONLY_SETTINGS = (
    ("wesar_init_std", None, "--wesar-init-std"),
    ("wesar_targets", "init", "--wesar-targets"),
    ("wesar_fused_qkv_gate", False, "--wesar-fused-qkv-gate"),
    ("wesar_gate_output_layer", True, "--wesar-no-output-gate"),
    ("wesar_embedding_common_std", False, "--wesar-embedding-common-std"),
    ("wesar_gate_side", "auto", "--wesar-gate-side"),
)


def wesar_settings_in_use(fields: dict) -> list:
    """[(field, value, flag)] of the WESAR_ONLY_SETTINGS that `fields` (StabilityConfig field
    values) sets to anything but their unused value."""
    return [(field, fields[field], flag) for field, unused, flag in WESAR_ONLY_SETTINGS
            if fields.get(field, unused) != unused]


@dataclass
class StabilityConfig(TransformerConfig):
    """TransformerConfig plus the loss-spike fixes of [SNM] and [WeSaR]."""

    init_style: Literal["scaled", "xavier", "plain"] = "scaled"
    """[SNM] §3.1. "scaled" (upstream): W_O of attention and W_2 of the FFN use
    sigma/sqrt(2N), N = num_layers, which keeps each residual branch small. "xavier" (the name
    SNM's latest version gives this baseline; "plain" is an alias): every weight matrix uses
    sigma, so each branch output has std close to 1 and the residual stream grows layer after
    layer (the baseline the paper argues against)."""

    small_init: bool = False
    """[SNM] §2 / Nguyen & Salazar: sigma = sqrt(2 / (5 d)), d = hidden_size, instead of
    init_method_std. Also the embedding std unless embedding_init_method_std is given."""

    scaled_embed: bool = False
    """[SNM] §4 "Scaled Embed": multiply the embedding output by sqrt(d) so that the input of
    the first LayerNorm has std near 1 (sqrt(2/5) for small init) and the LN Jacobian, which is
    proportional to 1/std(input) ([SNM v2] Eq. 9-10; Eq. 12-14 in v4 [unverified]), no longer
    amplifies gradients."""

    embed_layernorm: bool = False
    """[SNM] §4 "Embed LN": a LayerNorm (the model's normalization type, fp32 parameters like
    the other norms) on the embedding output, making its std 1 from the first step."""

    embed_detach_alpha: Optional[float] = None
    """[SNM] baseline "Embed Detach" (GLM-130B's embedding gradient shrink): the embedding output
    e becomes gamma*e + (1-gamma)*e.detach(); the forward is unchanged and the gradient reaching
    the embedding tables is multiplied by gamma (GLM uses 0.1). None = off."""

    wesar: bool = False
    """[WeSaR] §3: every weight matrix W of attention (W_q, W_k, W_v, W_O) and FFN (W_1, W_2), and
    the prediction head when untied, gets a trainable scalar gate alpha and the layer computes
    alpha * (W x) (= W_bar x, W_bar = alpha * W; megatron_patch/wesar.py). All W are initialised
    with the common std `wesar_init_std`; alpha = target_std / wesar_init_std, the target being
    what `wesar_targets` asks for, so W_bar starts at the std of that scheme."""

    wesar_init_std: Optional[float] = None
    """[WeSaR] the common std of every gated W. None = the paper's sigma^2 = 4e-5
    (sigma = 0.0063; [unverified]: read off secondary summaries). With init_method_std instead,
    the gates of QKV/fc1 start at 1 and those of W_O/W_2 at 1/sqrt(2N) under scaled init. The
    spike study here found the small common sigma needs a large batch: at batch 8 and lr >= 1e-3
    every step moves each W by lr/sigma >= 16% of its scale (README, spike study)."""

    wesar_targets: Literal["init", "he"] = "init"
    """[WeSaR] the stds W_bar starts at. "init": this model's init scheme (init_method_std or
    small init; W_O, W_2 at sigma/sqrt(2N) under scaled init, the head at sigma). "he": He
    initialisation with residual scaling, sqrt(2/fan_in) per matrix and W_O, W_2 times
    1/sqrt(2N) (the paper's backbone per secondary summaries [unverified]; docs/wesar.md)."""

    wesar_fused_qkv_gate: bool = False
    """[WeSaR] one gate for the fused QKV matrix instead of three (W_q, W_k, W_v): the layout of
    this package's earlier releases, kept so that runs stay comparable."""

    wesar_gate_output_layer: bool = True
    """[WeSaR] gate the prediction head too (only when it is untied from the embedding; a tied
    head is the embedding table, which stays at gate 1)."""

    wesar_gate_side: Literal["auto", "weight", "activation"] = "auto"
    """[WeSaR] where alpha is applied (the function is the same): "weight" passes alpha * W to
    megatron-core's local linears (cheapest in time); "activation" scales the linear's output or
    input (Transformer Engine's linears, and local ones with gradient-accumulation fusion, which
    need W itself; no extra memory). "auto": weight where possible, else activation."""

    wesar_embedding_common_std: bool = False
    """[WeSaR] initialise the word (and position) embedding at the common std with gate 1,
    instead of embedding_init_method_std."""

    z_loss_coeff: float = 0.0
    """z-loss (PaLM §5; advised by the latest [SNM] version): add z_loss_coeff * (log Z)^2 per
    token, Z the softmax normaliser of the LM head's logits (megatron_patch/z_loss.py). 0 = off."""

    def __post_init__(self):
        self._validate_stability_options()
        if self.small_init:
            self.init_method_std = math.sqrt(2.0 / (5.0 * self.hidden_size))
        if self.embedding_init_method_std is None:
            self.embedding_init_method_std = self.init_method_std
        if self.init_style in XAVIER and self.output_layer_init_method is None:
            # Same std for W_O / W_2 as for every other matrix: no 1/sqrt(2N) ([SNM] §3.1).
            self.output_layer_init_method = init_method_normal(self.init_method_std)
        if self.wesar and self.wesar_init_std is None:
            self.wesar_init_std = WESAR_COMMON_STD
        if self.wesar and self.wesar_embedding_common_std:
            self.embedding_init_method_std = self.wesar_init_std
        super().__post_init__()

    # ----- derived quantities used by the model builder -----
    @property
    def embedding_fix(self) -> Optional[str]:
        """Which [SNM] embedding treatment is on: "scale", "layernorm", "detach" or None."""
        if self.scaled_embed:
            return "scale"
        if self.embed_layernorm:
            return "layernorm"
        if self.embed_detach_alpha is not None:
            return "detach"
        return None

    @property
    def output_layer_target_std(self) -> float:
        """Std the init scheme asks for W_O / W_2: sigma/sqrt(2N) (scaled) or sigma (plain)."""
        if self.init_style in XAVIER:
            return self.init_method_std
        return self.init_method_std / math.sqrt(2.0 * self.num_layers)

    @property
    def uses_stability_options(self) -> bool:
        return bool(
            self.embedding_fix or self.wesar or self.init_style != "scaled" or self.small_init
            or self.z_loss_coeff
        )

    def _validate_stability_options(self):
        def fail(msg):
            raise StabilityConfigError(msg)

        if self.init_style not in ("scaled",) + XAVIER:
            fail(f"init_style must be 'scaled' or 'xavier' ('plain'), got {self.init_style!r}")
        fixes = [name for name, on in (
            ("scaled_embed", self.scaled_embed),
            ("embed_layernorm", self.embed_layernorm),
            ("embed_detach_alpha", self.embed_detach_alpha is not None),
        ) if on]
        if len(fixes) > 1:
            fail(f"choose one embedding treatment, not {' + '.join(fixes)}")
        if self.embed_detach_alpha is not None and not 0.0 < self.embed_detach_alpha <= 1.0:
            fail(f"embed_detach_alpha must be in (0, 1], got {self.embed_detach_alpha}")
        if self.scaled_embed and (self.embedding_init_method_std or 0.0) >= 0.5:
            fail("scaled_embed multiplies the embeddings by sqrt(d), and embedding_init_method_std="
                 f"{self.embedding_init_method_std} already makes them std ~1: use one or the other")
        if self.init_style in XAVIER and self.output_layer_init_method is not None:
            fail(f"init_style={self.init_style!r} sets output_layer_init_method itself; do not pass both")
        if self.wesar and self.wesar_init_std is not None and self.wesar_init_std <= 0:
            fail(f"wesar_init_std must be > 0, got {self.wesar_init_std}")
        if self.z_loss_coeff < 0:
            fail(f"z_loss_coeff must be >= 0, got {self.z_loss_coeff}")
        if self.wesar_targets not in ("init", "he"):
            fail(f"wesar_targets must be 'init' or 'he', got {self.wesar_targets!r}")
        if self.wesar_gate_side not in ("auto", "weight", "activation"):
            fail(f"wesar_gate_side must be 'auto', 'weight' or 'activation', got {self.wesar_gate_side!r}")
        wesar_only = wesar_settings_in_use(vars(self))
        if wesar_only and not self.wesar:
            fail(f"{', '.join(f'{field}={value!r}' for field, value, _ in wesar_only)} only apply with wesar=True")
        if self.wesar and self.attention_output_gate and not self.wesar_fused_qkv_gate:
            fail("attention_output_gate adds gate rows to the fused QKV output; use "
                 "wesar_fused_qkv_gate (one gate for the whole matrix) with it")
        if self.uses_stability_options:
            uncovered = [name for name, on in (
                ("multi_latent_attention (MLA)", self.multi_latent_attention),
                ("mtp_num_layers (multi-token prediction)", bool(self.mtp_num_layers)),
                ("num_moe_experts (MoE)", bool(self.num_moe_experts)),
            ) if on]
            if uncovered:
                fail(f"the stabilization options do not cover {', '.join(uncovered)}; "
                     "turn those off or run without the options")


# ---------------------------------------------------------------- command line
# The flags themselves: megatron_patch/stability_flags.py (no megatron-core import, so --help is quick).
def stability_kwargs(args: argparse.Namespace) -> dict:
    """StabilityConfig fields from parsed args. Raises StabilityConfigError on contradictions."""
    # The trainer leaves --init-method-std at None unless given, so the conflict is visible.
    if args.small_init and getattr(args, "init_method_std", None) is not None:
        raise StabilityConfigError("--small-init sets sigma itself; drop --init-method-std")
    kwargs = dict(
        init_style=args.init_style,
        small_init=args.small_init,
        scaled_embed=args.scaled_embed,
        embed_layernorm=args.embed_layernorm,
        embed_detach_alpha=args.embed_detach_alpha,
        wesar=args.wesar,
        wesar_init_std=args.wesar_init_std,
        wesar_targets=getattr(args, "wesar_targets", "init"),
        wesar_fused_qkv_gate=getattr(args, "wesar_fused_qkv_gate", False),
        wesar_gate_output_layer=not getattr(args, "wesar_no_output_gate", False),
        wesar_embedding_common_std=getattr(args, "wesar_embedding_common_std", False),
        wesar_gate_side=getattr(args, "wesar_gate_side", "auto"),
        z_loss_coeff=getattr(args, "z_loss_coeff", 0.0),
    )
    wesar_flags = [flag for _, _, flag in wesar_settings_in_use(kwargs)]
    if wesar_flags and not args.wesar:
        raise StabilityConfigError(f"{' '.join(wesar_flags)} needs --wesar")
    return kwargs
