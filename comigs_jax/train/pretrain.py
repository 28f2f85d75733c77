"""Pretraining a small GPT-2 base from scratch (all parameters), for the self-contained demo.

The demo's base learns the synthetic data's shared ("general") chain, then serves as the frozen
base of the federated run, like a pretrained GPT-2 serves the paper's runs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from comigs_jax.model.config import GPT2Config
from comigs_jax.model.gpt2 import GPT2, init_params
from comigs_jax.train.steps import sample_windows


def pretrain(cfg: GPT2Config, stream: np.ndarray, *, steps: int, batch_size: int, seq_len: int, lr: float,
             seed: int = 0, chunk: int = 50, progress=None) -> tuple[dict, list[float]]:
    """Train every parameter of a plain GPT-2 on random windows of `stream` [N].

    AdamW with linear warm-up (5% of steps) and cosine decay. Returns (params, loss per chunk).
    progress: optional callable(step, loss) after each chunk of `chunk` jitted steps.
    """
    cfg = cfg.base
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr / 10),
                     b1=0.9, b2=0.95, weight_decay=0.1)
    tokens = jnp.asarray(stream)
    length = jnp.int32(len(stream))

    def loss_fn(params, windows):
        logits, _ = GPT2(cfg).apply({"params": params}, windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    @functools.partial(jax.jit, static_argnums=3, donate_argnums=(0, 1))
    def run_chunk(params, opt, key, n):
        def step(carry, k):
            params, opt = carry
            loss, g = jax.value_and_grad(loss_fn)(params, sample_windows(k, tokens, length, batch_size, seq_len))
            updates, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, updates), opt), loss
        (params, opt), losses = jax.lax.scan(step, (params, opt), jax.random.split(key, n))
        return params, opt, losses.mean()

    key = jax.random.PRNGKey(seed)
    params = init_params(cfg, jax.random.fold_in(key, 1))
    opt = tx.init(params)
    history, done = [], 0
    while done < steps:
        n = min(chunk, steps - done)
        params, opt, loss = run_chunk(params, opt, jax.random.fold_in(key, 2 + done), n)
        done += n
        history.append(float(loss))
        if progress is not None:
            progress(done, history[-1])
    return jax.tree.map(np.asarray, params), history
