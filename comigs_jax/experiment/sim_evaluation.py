"""A Simulation's users scored on their own splits (test, or validation): the windows of a protocol
(comigs_jax.train.evaluation) per user, one jitted program over the sharded user axis."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax import distributed
from comigs_jax.experiment import programs
from comigs_jax.train.evaluation import eval_windows, full_window_counts


def params_per_user(sim) -> dict:
    """[user rows, ...] trainable params on the users axis: each user's model (as the model sees it),
    or its federation's one pooled model (Centralized)."""
    if not sim.method.pooled_data:
        return sim.model_params()
    idx = jnp.asarray(sim.layout.federation_of_rows(user_axis=True))  # user row -> its federation's model
    take = lambda p: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), p)
    return jax.jit(take, out_shardings=sim.layout.users)(sim.states.params)


def evaluate_users(sim, splits: Sequence[np.ndarray], n_windows: int, batch: int, protocol: str = "full",
                   seed=0) -> dict:
    """Simulation.evaluate's numbers for every real user row, [F * U, ...] (its docstring)."""
    if len(splits) != len(sim.user_indices):
        raise ValueError(f"evaluate: {len(splits)} splits for the {len(sim.user_indices)} users given")
    # Users (not models: Centralized's one model is scored on every user) on the users axis.
    lay = sim.layout
    n_rows, rows, n_real = lay.n_user_rows, lay.local_user_rows, lay.n_user_total
    fed, idx = lay.federation_of_rows(True)[rows], lay.index_of_rows(True)[rows]
    seeds = [seed] * sim.n_federations if np.ndim(seed) == 0 else list(seed)
    if len(seeds) != sim.n_federations:
        raise ValueError(f"evaluate: {len(seeds)} seeds for {sim.n_federations} federations")
    given = dict(zip(sim.user_indices, splits))
    missing = sorted({int(u) for r, u in zip(rows, idx) if r < n_real and u not in given})
    if missing:
        raise ValueError(f"evaluate: users {missing[:5]} live on this process's devices but were not given")
    arrays = {r: given[u] if r < n_real else np.zeros(sim.tc.seq_len + 1, sim.token_dtype)
              for r, u in zip(rows, idx)}
    lengths = np.array([len(arrays[r]) for r in rows])
    counts = full_window_counts(lengths, sim.tc.seq_len) if protocol == "full" else np.zeros(1, int)
    min_windows = distributed.global_max(int(counts.max()))
    parts = [eval_windows(protocol, lengths[fed == f], sim.tc.seq_len, n_windows, batch, seeds[f],
                          user_ids=idx[fed == f], min_windows=min_windows) for f in np.unique(fed)]
    starts, weights = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    tokens, _ = sim._place_rows(arrays, user_axis=True)
    place = lambda a: lay.place(a, user_axis=True)
    masks = sim.masks if not sim.method.pooled_data else np.repeat(sim.masks[:1], n_rows, 0)
    program = programs.eval_program(sim.model_cfg, sim.tc.seq_len, batch, sim.mesh, lay.user_chunk)
    out = program(params_per_user(sim), sim.base, tokens, place(starts), place(weights), place(masks[rows]))
    out = jax.tree.map(lambda x: distributed.to_host(x)[:n_real], out)
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), out)  # [U, n_batches, ...]
    w = out.pop("weight")
    res = {"ce": out.pop("ce_sum").sum(1) / (w.sum(1) * sim.tc.seq_len),
           "n_tokens": (w.sum(1) * sim.tc.seq_len).astype(np.int64)}
    for k, v in out.items():  # batch means, weighted by the batch's real windows
        wk = w.reshape(w.shape + (1,) * (v.ndim - 2))
        res[k] = (v * wk).sum(1) / wk.sum(1)
    return res
