"""Model configuration: GPT-2 and Llama sizes plus the optional LoRA / mixture-of-experts adapters.

Frozen dataclasses, so that they are hashable and can be Flax Linen module attributes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from comigs_jax.model.precision import check_x64

LORA_SCALINGS = ("rslora", "lora")
ROUTER_KINDS = ("learned", "uniform", "user", "noisy_topk")  # noisy_topk: Llama only (model/noisy_gate.py)
LB_INPUTS = ("block_output", "router_input")
# float64 needs 64-bit JAX (jax.enable_x64): the tests compare two programs of the same math in it
# (comigs_jax.model.precision).
DTYPES = ("float32", "bfloat16", "float64")
# What the backward recomputes instead of keeping: "none"; "block": every transformer block
# (only its input is kept); "moe": the mixture MLP's per-expert [E, N, 4d] tensors.
REMAT = ("none", "block", "moe")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """One low-rank adapter: y = x W + b + s (x A) B.

    scaling: "rslora" gives s = alpha / sqrt(rank) (the CoMiGS reference); "lora" gives
    s = alpha / rank (the peft convention).
    """

    rank: int = 8
    alpha: float = 16.0
    scaling: str = "rslora"
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank={self.rank}: must be a positive integer")
        if self.scaling not in LORA_SCALINGS:
            raise ValueError(f"LoRA scaling={self.scaling!r}: allowed {LORA_SCALINGS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout}: must be in [0, 1)")

    @property
    def scale(self) -> float:
        if self.scaling == "rslora":
            return self.alpha / self.rank**0.5
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MLP as a mixture of LoRA experts (method.md §1.3-1.6).

    n_experts is E_max, the largest expert count of any user; users with fewer experts mask
    the rest. Slots [0, n_generalists) are generalists, the others specialists.
    router: "learned" (a bias-free linear router per block), "uniform" (no router: the
    uniform mean of the present experts, as the reference's Local/FedAvg baselines) or "user"
    (one learned logit vector [E] per block, no token input: the same weights for every token)
    or "noisy_topk" (Llama only: 2d42464's TopKBalancedNoisyGate, comigs_jax.model.noisy_gate).
    lb_input: what the load-balancing loss routes: "block_output" (the reference, quirk Q1)
    or "router_input" (the ln_2 output, the router's own input).
    importance: `expert0_importance` of the reference; 0 disables the expert factors.
    """

    n_experts: int = 2
    n_generalists: int = 1
    top_k: int = 2
    lora: LoRAConfig = LoRAConfig()
    router: str = "learned"
    lb_input: str = "block_output"
    importance: float = 0.5

    def __post_init__(self):
        if self.n_experts < 1:
            raise ValueError(f"n_experts={self.n_experts}: must be >= 1")
        if not 0 <= self.n_generalists <= self.n_experts:
            raise ValueError(
                f"n_generalists={self.n_generalists}: must be in [0, n_experts={self.n_experts}]")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router={self.router!r}: allowed {ROUTER_KINDS}")
        if self.lb_input not in LB_INPUTS:
            raise ValueError(f"lb_input={self.lb_input!r}: allowed {LB_INPUTS}")
        if not 0.0 <= self.importance < 1.0:
            raise ValueError(f"importance={self.importance}: must be in [0, 1)")

    @property
    def n_specialists(self) -> int:
        return self.n_experts - self.n_generalists


def _check_model_fields(cfg, positive: tuple) -> None:
    """The checks every model config shares (one-line ValueErrors): the `positive` size fields,
    remat, head_block and dtype."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be a positive integer")
    if cfg.remat not in REMAT:
        raise ValueError(f"remat={cfg.remat!r}: allowed {REMAT}")
    if not isinstance(cfg.head_block, int) or cfg.head_block < 0:
        raise ValueError(f"head_block={cfg.head_block!r}: must be an integer >= 0 (0 = full logits)")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: allowed {DTYPES}")
    check_x64(cfg.dtype)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 sizes (defaults: GPT-2 124M) and the adapters that turn it into CoMiGS.

    attn_lora: LoRA on the attention's c_attn and c_proj (None: plain attention).
    moe: the MLP as a mixture of LoRA experts (None: the plain GPT-2 MLP).
    dtype: activation dtype; parameters are float32 (float64 for a float64 model,
      comigs_jax.model.precision).
    remat: what the backward recomputes rather than keeps, one of REMAT (same values and
      gradients, less memory, more compute). XLA's CPU compiler folds the recomputation back into
      the forward pass (comigs_jax.model.moe): on CPU it changes nothing unless
      XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander.
    head_block: vocabulary block of the training / evaluation cross-entropy
      (comigs_jax.model.head): the loss never holds more than [N, head_block] logits; 0 builds the
      full [B, T, V] logits. Only the loss uses it; GPT2's logits output is always full. 2048 was
      among the fastest on CPU (4 layers x 256, V 50,257, 8 x 128 tokens: a step about 15 % faster
      than with the full logits, 10 % faster than 8192; compiled temporaries 254 MiB against 617).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"
    attn_lora: Optional[LoRAConfig] = None
    moe: Optional[MoEConfig] = None
    remat: str = "none"
    head_block: int = 2048

    def __post_init__(self):
        _check_model_fields(self, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"))
        if self.moe is not None and self.moe.router == "noisy_topk":
            raise ValueError("router='noisy_topk' (the Llama reference's gate) is for the Llama family only, not GPT-2")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    family = "gpt2"  # the architecture, for code that dispatches on it (not a dataclass field)

    @property
    def base(self) -> "GPT2Config":
        """The same sizes without adapters: the plain GPT-2 that checkpoints hold."""
        return dataclasses.replace(self, attn_lora=None, moe=None)


# Hugging Face's named GPT-2 sizes.
GPT2_SIZES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


ROPE_TYPES = ("llama3",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Hugging Face's "llama3" RoPE frequency adjustment (Llama 3.1 / 3.2): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those shorter
    than original_max_position_embeddings / high_freq_factor are kept, the band between is
    interpolated. No attention scaling (HF's attention_factor is 1 for llama3)."""

    rope_type: str = "llama3"
    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: allowed {ROPE_TYPES} (or no rope scaling)")
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ValueError(f"rope scaling factor={self.factor}, original_max_position_embeddings="
                             f"{self.original_max_position_embeddings}: must be positive")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"rope scaling low_freq_factor={self.low_freq_factor}, high_freq_factor="
                             f"{self.high_freq_factor}: need 0 < low < high")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama sizes (defaults: SmolLM2-135M) and the same adapters as GPT2Config.

    The fields the engine reads have GPT2Config's names and meaning (vocab_size, n_positions,
    n_embd, n_layer, n_head, dtype, attn_lora, moe, remat, head_block, `base`); attn_lora puts
    LoRA on q/k/v/o_proj, moe turns the SwiGLU MLP into a mixture of LoRA experts.
    n_kv_head: key/value heads (grouped-query attention; n_head must be a multiple).
    intermediate_size: the SwiGLU width F. head_dim: 0 means n_embd // n_head.
    n_positions: the longest sequence the model is meant for (RoPE has no position table).
    rope_scaling: None (plain RoPE) or RopeScaling ("llama3").
    tie_word_embeddings: the LM head is the token embedding (no lm_head kernel).
    """

    vocab_size: int = 49152
    n_positions: int = 8192
    n_embd: int = 576
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    intermediate_size: int = 1536
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    attn_lora: Optional[LoRAConfig] = None
    moe: Optional[MoEConfig] = None
    remat: str = "none"
    head_block: int = 2048

    family = "llama"

    def __post_init__(self):
        _check_model_fields(self, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head",
                                   "intermediate_size"))
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim < 0:
            raise ValueError(f"head_dim={self.head_dim}: must be >= 0 (0 = n_embd // n_head)")
        if self.head_dim == 0 and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head} (set head_dim)")
        if self.dim_head % 2:
            raise ValueError(f"head_dim={self.dim_head}: rotary embeddings need an even head dimension")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps}, rope_theta={self.rope_theta}: must be positive")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling={self.rope_scaling!r}: must be None or a RopeScaling")

    @property
    def dim_head(self) -> int:
        """The per-head dimension actually used: head_dim, or n_embd // n_head when it is 0."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def base(self) -> "LlamaConfig":
        """The same sizes without adapters: the plain Llama that checkpoints hold."""
        return dataclasses.replace(self, attn_lora=None, moe=None)


# Named Llama sizes (Hugging Face's config.json values).
LLAMA_SIZES = {
    "smollm2-135m": dict(vocab_size=49152, n_positions=8192, n_embd=576, n_layer=30, n_head=9,
                         n_kv_head=3, intermediate_size=1536, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, n_positions=131072, n_embd=2048, n_layer=16, n_head=32,
                         n_kv_head=8, intermediate_size=8192, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
}
