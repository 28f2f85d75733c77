"""Tiny models and data shared by the engine tests (milliseconds per step on a CPU)."""
import functools

import jax
import numpy as np

from comigs_jax.federated.roles import split_base
from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import GPT2, init_params

VOCAB = 32


def random_like(tree, scale: float, seed: int):
    """Every leaf replaced by scale * N(0, 1) float32, drawn with NumPy: an eager jax.random call
    per leaf shape would be one XLA compile each (about half a second on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(np.shape(x))).astype(np.float32), tree)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens, mask=None):
    """GPT2(cfg).apply({"params": params}, tokens, mask), jitted: one compile per config instead of
    an op-by-op trace (seconds per call on CPU)."""
    return GPT2(cfg).apply({"params": params}, tokens, mask)


def tiny_cfg(n_experts=2, n_generalists=1, top_k=2, n_layer=1):
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=n_layer, n_head=2,
                      attn_lora=LoRAConfig(rank=2),
                      moe=MoEConfig(n_experts=n_experts, n_generalists=n_generalists, top_k=top_k,
                                    lora=LoRAConfig(rank=2)))


def tiny_base(cfg, seed=0):
    """A random frozen base whose tied embedding is large enough (N(0, 1), not GPT-2's N(0, 0.02))
    for its logits to leave uniform: with tiny random embeddings, LoRA alone cannot learn."""
    base = split_base(init_params(cfg.base, jax.random.key(seed)))[0]
    base["wte"]["embedding"] = base["wte"]["embedding"] * 50.0
    return base


def markov_users(n_users, n_tokens, seed=0, sharpness=4.0):
    """Each user: its own sparse first-order Markov chain over VOCAB tokens (learnable, distinct)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        logits = sharpness * rng.normal(size=(VOCAB, VOCAB))
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        x = np.zeros(n_tokens, np.uint16)
        u = rng.random(n_tokens)
        cdf = p.cumsum(1)
        for t in range(1, n_tokens):
            x[t] = min(np.searchsorted(cdf[x[t - 1]], u[t]), VOCAB - 1)
        out.append(x)
    return out
