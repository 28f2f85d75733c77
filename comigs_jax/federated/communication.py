"""What a method communicates: parameters and bytes per user per round, from the roles alone.

A user that takes part in an aggregation round uploads its leaves of the method's shared roles
and every user downloads their mean (`aggregate.py`: users that sat a round out still receive
it). Counts come from the model's parameter tree (`comigs_jax.model.lm.param_shapes`), so they
hold for either family and any adapter shape. Expert leaves are padded to the largest expert
count; when specialists are shared, only the slots every user has are averaged (the first
min(E_i) - G, as `aggregate` does), so every user sends the same count.

Not counted: the round-0 synchronisation of the shared leaves (one broadcast, or none when the
users share a seed), control messages, and Centralized, which pools the users' data instead of
communicating parameters (its counts are None). The reference's Local and FedAvg hold a router
(method.md §8, Q5) that is averaged under its `all` strategy; ours has none, so our FedAvg count is
the reference's without the router's n_embd x E per layer.
"""
from __future__ import annotations

import numpy as np
from flax import traverse_util

from comigs_jax.federated.methods import Method
from comigs_jax.federated.roles import role_of
from comigs_jax.model.lm import ModelConfig, param_shapes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def shared_params_per_user(model_cfg: ModelConfig, method: Method, expert_counts) -> np.ndarray:
    """[U] int64: parameters each user uploads (and downloads) in one aggregation round: its
    leaves of the shared roles, of the specialist slots only the min(E_i) - G that `aggregate`
    averages. `expert_counts` [U]: each user's experts E_i (<= model_cfg.moe.n_experts)."""
    moe = model_cfg.moe
    counts = np.asarray(expert_counts, np.int64)
    if counts.ndim != 1 or (counts > moe.n_experts).any() or (counts < max(moe.n_generalists, 1)).any():
        raise ValueError(f"expert_counts={counts.tolist()}: each in [max(1, n_generalists={moe.n_generalists}), "
                         f"n_experts={moe.n_experts}]")
    fixed, specialist = 0, 0  # parameters every user sends; those of all specialist slots
    for path, s in traverse_util.flatten_dict(param_shapes(model_cfg)).items():
        role = role_of(path)
        if not method.is_shared(path):  # another role, an unshared factor (FedSA's B), a frozen one (FFA's A)
            continue
        if role == "specialist":
            specialist += int(np.prod(s.shape))
        else:
            fixed += int(np.prod(s.shape))
    per_slot = specialist // moe.n_specialists if moe.n_specialists else 0
    shared_slots = max(int(counts.min()) - moe.n_generalists, 0)  # Simulation's n_shared_specialists
    return np.full(len(counts), fixed + per_slot * shared_slots, np.int64)


def accounting(model_cfg: ModelConfig, method: Method, expert_counts, rounds: int, rounds_taken) -> dict:
    """results.json's `communication`: per user, the parameters of one aggregation round, the
    rounds it uploaded in (`rounds_taken` [U]: the rounds it trained in) and downloaded in (every
    one of the run's `rounds` aggregations), and the run's bytes up and down in float32 and
    bfloat16. Methods that synchronise only at round 0 (`one_round`) communicate nothing per round."""
    n_users = len(expert_counts)
    if method.pooled_data:
        return {"per_round_params": None, "note": "Centralized pools the users' data; no parameters are exchanged"}
    if method.pcl is not None:
        return pcl_accounting(model_cfg, method, n_users, rounds)
    per_round = shared_params_per_user(model_cfg, method, expert_counts)
    taken = np.asarray(rounds_taken, np.int64)
    aggregations = 0 if method.one_round else int(rounds)
    up_rounds = np.zeros(n_users, np.int64) if method.one_round else taken
    out = {"per_round_params": per_round.tolist(), "upload_rounds": up_rounds.tolist(),
           "download_rounds": [aggregations] * n_users}
    for dtype, b in DTYPE_BYTES.items():
        out[f"upload_bytes_{dtype}"] = (per_round * up_rounds * b).tolist()
        out[f"download_bytes_{dtype}"] = (per_round * aggregations * b).tolist()
    return out


def pcl_accounting(model_cfg: ModelConfig, method: Method, n_users: int, rounds: int) -> dict:
    """PCL (no server): in each mixing round every user sends its whole trainable model to the
    U - 1 others (who score it on their validation data and mix it in) and receives theirs.
    Counted per user as one upload (a broadcast) and U - 1 downloads of its trainable parameters
    (padded to the largest expert count)."""
    from comigs_jax.federated.pcl import mixes_after
    per_user = sum(int(np.prod(s.shape)) for path, s in traverse_util.flatten_dict(param_shapes(model_cfg)).items()
                   if role_of(path) != "base")
    mixing = sum(mixes_after(method.pcl, r) for r in range(rounds))
    out = {"per_round_params": [per_user] * n_users, "upload_rounds": [mixing] * n_users,
           "download_rounds": [mixing] * n_users, "downloads_per_round": n_users - 1,
           "note": "PCL: no server; each mixing round every user broadcasts its whole trainable model and "
                   "receives the other users' models"}
    for dtype, b in DTYPE_BYTES.items():
        out[f"upload_bytes_{dtype}"] = [per_user * mixing * b] * n_users
        out[f"download_bytes_{dtype}"] = [per_user * mixing * (n_users - 1) * b] * n_users
    return out
