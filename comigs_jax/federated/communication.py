"""What a method communicates: parameters and bytes per user per round, from the roles alone.

A user that takes part in an aggregation round uploads its leaves of the method's shared roles
and every user downloads their mean (`aggregate.py`: users that sat a round out still receive
it). Counts come from the model's parameter tree (`comigs_jax.model.lm.param_shapes`), so they
hold for either family and any adapter shape. Expert leaves are padded to the largest expert
count; when specialists are shared, only the slots every user has are averaged (the first
min(E_i) - G, as `aggregate` does), so every user sends the same count.

Per-user LoRA ranks (model.ranks, HetLoRA, FlexLoRA; method.md §7): every expert LoRA leaf is
held at the padded rank r_max, but a user of rank r_i exchanges only its r_i components of each
shared expert factor (A [.., in, r_i], B [.., r_i, out]): the masked mean and HetLoRA send the
components below its rank and receive the server's truncated to it, FlexLoRA sends its rank-r_i
factors and receives the server's SVD factors at r_i. HetLoRA's self-pruning lowers a user's rank
during the run: in round t it uploads at the rank it trained at (its rank after round t - 1's cut)
and downloads at its rank after round t's cut (the server's leaves truncated to it), from the
per-round ranks the run logs (metrics.jsonl `expert_ranks`, after each aggregation). HetLoRA as
the reference keeps a rank per LoRA module (each layer's fc and proj of each expert) and is counted
per module, from metrics.jsonl `expert_module_ranks` (a module cut to rank 0 exchanges nothing).
The attention LoRA is not ranked (every user model.attn_rank).

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
from comigs_jax.federated.ranks import _pair, is_ranked, leaf_modules, module_layout, n_modules, shared_slots
from comigs_jax.federated.roles import factor_of, role_of
from comigs_jax.model.lm import ModelConfig, param_shapes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def shared_params_per_user(model_cfg: ModelConfig, method: Method, expert_counts, ranks=None) -> np.ndarray:
    """[U] int64: parameters each user uploads (and downloads) in one aggregation round: its
    leaves of the shared roles, of the specialist slots only the min(E_i) - G that `aggregate`
    averages. `expert_counts` [U]: each user's experts E_i (<= model_cfg.moe.n_experts). `ranks`:
    [U] each user's expert LoRA rank r_i, or [U, M] its rank per LoRA module (HetLoRA as the
    reference; comigs_jax.federated.ranks.module_layout's order), each in [0, the padded rank
    moe.lora.rank] (None: that rank for all; 0: a module whose adapter a cut removed): of each
    shared expert LoRA factor only the components below its module's rank count."""
    moe = model_cfg.moe
    counts = np.asarray(expert_counts, np.int64)
    if counts.ndim != 1 or (counts > moe.n_experts).any() or (counts < max(moe.n_generalists, 1)).any():
        raise ValueError(f"expert_counts={counts.tolist()}: each in [max(1, n_generalists={moe.n_generalists}), "
                         f"n_experts={moe.n_experts}]")
    shapes = traverse_util.flatten_dict(param_shapes(model_cfg))
    layout = {p: (lead, off) for p, lead, off in module_layout(shapes, rows=False)}
    n_mod, r_max = n_modules(shapes), moe.lora.rank
    r = np.full(len(counts), r_max, np.int64) if ranks is None else np.asarray(ranks, np.int64)
    if r.ndim == 1 and r.shape == counts.shape:
        r = np.repeat(r[:, None], n_mod, axis=1)
    if r.shape != (len(counts), n_mod) or (r < 0).any() or (r > r_max).any():
        raise ValueError(f"ranks of shape {list(r.shape)} (max {r.max(initial=0)}, min {r.min(initial=0)}): one per "
                         f"user ([{len(counts)}]) or per user and LoRA module ([{len(counts)}, {n_mod}]), each in "
                         f"[0, the padded rank {r_max}]")
    shared_slots_n = max(int(counts.min()) - moe.n_generalists, 0)  # Simulation's n_shared_specialists
    total = np.zeros(len(counts), np.int64)
    for path, s in shapes.items():
        if not method.is_shared(path):  # another role, an unshared factor (FedSA's B), a frozen one (FFA's A)
            continue
        if is_ranked(path):  # per module: its rank's components, each of `in` (A) or `out` (B) parameters
            lead, off = layout[path if factor_of(path) == "A" else _pair(path)]
            per_component = s.shape[-2] if factor_of(path) == "A" else s.shape[-1]
            rk = leaf_modules(r, lead, off)                                         # [U, *lead]
            on = shared_slots(path, lead, shared_slots_n if role_of(path) == "specialist" else None)
            total += per_component * (rk * on).reshape(len(counts), -1).sum(1)
        elif role_of(path) == "specialist":
            total += int(np.prod(s.shape)) // moe.n_specialists * shared_slots_n
        else:
            total += int(np.prod(s.shape))
    return total


def accounting(model_cfg: ModelConfig, method: Method, expert_counts, rounds: int, rounds_taken, ranks=None,
               round_ranks=None, round_taken=None) -> dict:
    """results.json's `communication`: per user, the parameters of one aggregation round, the
    rounds it uploaded in (`rounds_taken` [U]: the rounds it trained in) and downloaded in (every
    one of the run's `rounds` aggregations), and the run's bytes up and down in float32 and
    bfloat16. Methods that synchronise only at round 0 (`one_round`) communicate nothing per round.

    Per-user ranks: `ranks` [U] the configured expert LoRA ranks (per_round_params counts them);
    `round_ranks` [rounds, U] (or [rounds, U, M], a rank per LoRA module: HetLoRA as the reference)
    each round's ranks after its aggregation (HetLoRA's cuts) with
    `round_taken` [rounds, U] bool, whether the user trained (uploaded) in that round: round t's
    upload counts at the ranks after round t - 1 (round 0: `ranks`), its download at round t's.
    The totals are then `upload_params` / `download_params`, and the bytes follow them."""
    n_users = len(expert_counts)
    if method.pooled_data:
        return {"per_round_params": None, "note": "Centralized pools the users' data; no parameters are exchanged"}
    if method.pcl is not None:
        return pcl_accounting(model_cfg, method, n_users, rounds)
    per_round = shared_params_per_user(model_cfg, method, expert_counts, ranks)
    taken = np.asarray(rounds_taken, np.int64)
    aggregations = 0 if method.one_round else int(rounds)
    up_rounds = np.zeros(n_users, np.int64) if method.one_round else taken
    out = {"per_round_params": per_round.tolist(), "upload_rounds": up_rounds.tolist(),
           "download_rounds": [aggregations] * n_users}
    up, down = per_round * up_rounds, per_round * aggregations
    if ranks is not None:
        out["ranks"] = [int(r) for r in ranks]
    if round_ranks is not None and not method.one_round:
        after = np.asarray(round_ranks, np.int64)
        after = after.reshape((-1, n_users) + (after.shape[2:] if after.ndim == 3 else ()))
        took = np.asarray(round_taken, bool).reshape(after.shape[:2])
        first = np.asarray(ranks if ranks is not None else after[0], np.int64)
        if after.ndim == 3 and first.ndim == 1:  # the configured ranks: every module of a user at its rank
            first = np.repeat(first[:, None], after.shape[2], axis=1)
        before = np.concatenate([first[None], after[:-1]])
        count = {}  # per distinct rank vector, the per-user counts (few: ranks only fall)

        def params(rk):
            key = tuple(int(x) for x in np.ravel(rk))
            if key not in count:
                count[key] = shared_params_per_user(model_cfg, method, expert_counts, rk)
            return count[key]

        up = sum((params(b) * t for b, t in zip(before, took)), np.zeros(n_users, np.int64))
        down = sum((params(a) for a in after), np.zeros(n_users, np.int64))
        out["upload_rounds"] = took.sum(0).astype(np.int64).tolist()
        out["final_ranks"] = after[-1].tolist() if len(after) else out.get("ranks")
        out["upload_params"], out["download_params"] = up.tolist(), down.tolist()
    for dtype, b in DTYPE_BYTES.items():
        out[f"upload_bytes_{dtype}"] = (up * b).tolist()
        out[f"download_bytes_{dtype}"] = (down * b).tolist()
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
