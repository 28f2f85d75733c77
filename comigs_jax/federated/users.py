"""Users as an array axis: padded token arrays, expert masks, padding to the device count."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def padded_user_count(n_users: int, n_devices: int) -> int:
    """The smallest multiple of n_devices that holds n_users (the users axis must divide it)."""
    if n_users <= 0:
        raise ValueError(f"n_users={n_users}: at least one user is needed")
    return -(-n_users // n_devices) * n_devices


def device_chunk(n_rows: int, n_devices: int, chunk: int) -> int:
    """The chunk each device runs of an axis of n_rows real rows (train.user_chunk = chunk): the
    chunk when it is smaller than a device's share, else 0 (all of a device's rows at once)."""
    per_device = -(-n_rows // n_devices)
    return chunk if 0 < chunk < per_device else 0


def stack_tokens(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-user 1-D token arrays -> (tokens [U, N_max], lengths [U]).

    Shorter users are zero-padded and keep their true length, so that sampled windows never
    cross into padding.
    """
    arrays = list(arrays)
    dtype = np.result_type(*[a.dtype for a in arrays])
    n_max = max(len(a) for a in arrays)
    out = np.zeros((len(arrays), n_max), dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out, np.array([len(a) for a in arrays], np.int32)


def expert_masks(expert_counts: Sequence[int], n_experts: int, n_total: int | None = None) -> np.ndarray:
    """[U, E_max] bool: user i has experts [0, expert_counts[i]). Padding users copy user 0."""
    counts = list(expert_counts)
    n_total = len(counts) if n_total is None else n_total
    counts += [counts[0]] * (n_total - len(counts))
    return np.arange(n_experts)[None, :] < np.asarray(counts)[:, None]


def real_user_mask(n_users: int, n_total: int) -> np.ndarray:
    """[U_pad] bool: True for real users, False for padding."""
    return np.arange(n_total) < n_users
