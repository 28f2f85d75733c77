"""Evaluation protocols: which windows of a user's split are scored (method.md §5).

- ``full``: the whole split cut into non-overlapping windows: inputs x_k = t[T k : T k + T],
  targets t[T k + 1 : T k + T + 1], k = 0 .. floor((n - 1) / T) - 1 (the last (n - 1) mod T
  targets, fewer than one window, are not scored). Deterministic and independent of the seed and
  of n_windows. Users have different numbers of windows: each user's list is padded to a common
  multiple of the batch with weight-0 windows, so the reported cross-entropy is exactly the
  token mean over the user's own windows, and ppl = exp(token-mean CE). The default.
- ``fixed``: n_windows windows at evenly spaced starts over the whole split (they may overlap);
  deterministic, independent of the seed and of training.
- ``reference``: n_windows random windows (the training sampler: uniform starts, with
  replacement) from a generator seeded with the run's seed, as the reference's 100 random
  batches of 64 x 128 (n_windows = 6400).

Every protocol scores whole windows of T = seq_len targets, so the token mean is the mean of the
windows' mean cross-entropies, weighted by the window weights.
"""
from __future__ import annotations

import numpy as np

PROTOCOLS = ("full", "fixed", "reference")


def _check(protocol: str, lengths, seq_len: int) -> np.ndarray:
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol={protocol!r}: allowed {PROTOCOLS}")
    lengths = np.asarray(lengths, np.int64)
    last = lengths - seq_len - 1
    if (last < 0).any():
        u = int(np.argmax(last < 0))
        raise ValueError(f"user {u}: evaluation split has {lengths[u]} tokens, fewer than one window ({seq_len + 1})")
    return last


def window_starts(protocol: str, lengths, seq_len: int, n_windows: int, seed: int = 0,
                  user_ids=None) -> np.ndarray:
    """[U, n_windows] int32 window starts of the `fixed` and `reference` protocols, each in
    [0, length - seq_len - 1]. `reference` draws user u's windows from a generator seeded with
    (seed, user_ids[u]) (default: u), so they do not depend on which other users are scored."""
    last = _check(protocol, lengths, seq_len)
    if protocol == "full":
        raise ValueError("window_starts: the full protocol has a per-user number of windows; use eval_windows")
    if protocol == "fixed":
        frac = np.arange(n_windows) / max(n_windows - 1, 1)
        return np.floor(frac[None, :] * last[:, None]).astype(np.int32)
    ids = range(len(last)) if user_ids is None else user_ids
    return np.stack([np.random.default_rng([seed, int(u)]).integers(0, l + 1, n_windows)
                     for u, l in zip(ids, last)]).astype(np.int32)


def full_window_counts(lengths, seq_len: int) -> np.ndarray:
    """[U] number of non-overlapping windows of the `full` protocol: floor((n - 1) / seq_len)."""
    return (np.asarray(lengths, np.int64) - 1) // seq_len


def eval_windows(protocol: str, lengths, seq_len: int, n_windows: int, batch: int,
                 seed: int = 0, user_ids=None, min_windows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(starts [U, W] int32, weights [U, W] float32) with W a multiple of `batch`.

    `fixed` / `reference`: n_windows rounded up to a multiple of batch, every weight 1.
    `full`: W = the largest user's window count (at least min_windows: the largest over all
    processes, in a multi-host run) rounded up to a multiple of batch; a user's padding windows
    repeat its own windows (so every batch holds real text) with weight 0."""
    last = _check(protocol, lengths, seq_len)
    if protocol != "full":
        n = -(-n_windows // batch) * batch
        starts = window_starts(protocol, lengths, seq_len, n, seed, user_ids)
        return starts, np.ones(starts.shape, np.float32)
    counts = full_window_counts(lengths, seq_len)
    W = -(-max(int(counts.max()), min_windows) // batch) * batch
    k = np.arange(W)
    starts = (k[None, :] % counts[:, None]) * seq_len
    weights = (k[None, :] < counts[:, None]).astype(np.float32)
    assert (starts <= last[:, None]).all()
    return starts.astype(np.int32), weights
