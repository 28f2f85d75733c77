"""Evaluation protocols: which windows of a user's split are scored (method.md §5).

- ``fixed``: n_windows windows at evenly spaced starts over the whole split; deterministic,
  independent of the seed and of training. The default.
- ``reference``: n_windows random windows (the training sampler: uniform starts, with
  replacement) from a seeded generator, as the reference's 100 random batches of 64 x 128.
"""
from __future__ import annotations

import numpy as np

PROTOCOLS = ("fixed", "reference")


def window_starts(protocol: str, lengths, seq_len: int, n_windows: int, seed: int = 0) -> np.ndarray:
    """[U, n_windows] int32 window starts, each in [0, length - seq_len - 1]."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol={protocol!r}: allowed {PROTOCOLS}")
    lengths = np.asarray(lengths, np.int64)
    last = lengths - seq_len - 1
    if (last < 0).any():
        u = int(np.argmax(last < 0))
        raise ValueError(f"user {u}: evaluation split has {lengths[u]} tokens, fewer than one window ({seq_len + 1})")
    if protocol == "fixed":
        frac = np.arange(n_windows) / max(n_windows - 1, 1)
        return np.floor(frac[None, :] * last[:, None]).astype(np.int32)
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, l + 1, n_windows) for l in last]).astype(np.int32)
