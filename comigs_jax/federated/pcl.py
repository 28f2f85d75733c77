"""PCL: serverless collaboration by perplexity-weighted mixing of whole models (method.md §7).

The reference (`collab_run_client_level.py`, Table 1's `baseline_PCL.sh`) has no server and no
round-0 synchronisation: every user starts from its own initialisation and trains alone. After
some rounds (77efb25: the 0-indexed rounds r > 3 with r even, i.e. 4, 6, ..., 18; 2d42464: every
round) it scores every user j's model on every user i's validation split,

    ppl_ij = exp(mean CE of model j on 20 random batches of i's valid split)   (batch = train batch)
    W_ij   = softmax_j(-ppl_ij)                                             (no temperature)

and replaces every trainable leaf of every user by theta_i <- sum_j W_ij theta_j (optimizer
states are kept, as the reference keeps its AdamW states).

This module holds the rule (schedule, weights, mixing, windows); comigs_jax/experiment/pcl_mixing.py
scores the pairs of a Simulation. There the U x U (model, data) pairs are one jitted program: a `lax.map` over the model offset
k = 0 .. U-1 of a vmap over the (sharded, optionally chunked) user axis, in which row i scores
model j = k of its own federation on its own windows (`evaluate_user` on params gathered along the
user axis). At most U models' activations are alive at once (as a plain evaluation), never U^2.
Row i's windows are the same for every model j (common random windows, drawn from (seed, round,
user)); the reference draws fresh batches per pair, which only adds noise to W.

Several federations on one user axis (stacked seeds) mix within their own federation; padding
rows keep their parameters (W row = e_i) and are never mixed into a real row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax.model.precision import wide


def mixes_after(pcl, round_index: int) -> bool:
    """Whether the users mix after the 0-indexed round `round_index` (`pcl`: methods.PCL)."""
    return round_index >= pcl.start and round_index % pcl.every == 0


def collaboration_weights(ppl: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """W [R, R] float64: row i = softmax over j of -ppl[i, j] (ppl [R, R]: model j on user i's
    data), over the allowed [R, R] pairs only (others get weight 0). A row with no allowed pair
    (a padding row) is e_i: it keeps its own parameters."""
    ppl = np.asarray(ppl, np.float64)
    allowed = np.ones(ppl.shape, bool) if allowed is None else np.asarray(allowed, bool)
    logits = np.where(allowed, -ppl, -np.inf)
    has = allowed.any(1)
    m = np.where(has, np.max(np.where(allowed, logits, -np.inf), axis=1, initial=-np.inf), 0.0)
    e = np.where(allowed, np.exp(logits - m[:, None]), 0.0)
    w = np.where(has[:, None], e / np.where(has, e.sum(1), 1.0)[:, None], 0.0)
    pad = np.flatnonzero(~has)
    w[pad, pad] = 1.0
    return w


def mix_params(params: dict, weights: jax.Array) -> dict:
    """Every leaf [R, ...] -> W @ leaf over the leading row axis (float32 accumulation)."""
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(wide(x.dtype)), x.astype(wide(x.dtype)), axes=(1, 0))
                        .astype(x.dtype), params)


def pair_windows(lengths, seq_len: int, n_windows: int, seeds, round_index: int, user_ids) -> np.ndarray:
    """[R, n_windows] int32 random window starts (uniform, with replacement, as the reference's
    get_batch) for rows of valid-split `lengths` [R]; row r's from (seeds[r], round, user_ids[r])."""
    last = np.asarray(lengths, np.int64) - seq_len - 1
    if (last < 0).any():
        raise ValueError(f"PCL: a validation split has fewer than one window ({seq_len + 1} tokens)")
    return np.stack([np.random.default_rng([int(s), int(round_index), int(u)]).integers(0, l + 1, n_windows)
                     for s, u, l in zip(seeds, user_ids, last)]).astype(np.int32)
