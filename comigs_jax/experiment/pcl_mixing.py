"""PCL's mixing step on a Simulation: score every (model, data) pair, then mix (method.md §7).

The rule itself (schedule, W = softmax_j(-ppl_ij), theta_i <- sum_j W_ij theta_j, the windows) is
comigs_jax/federated/pcl.py, the mix the PCL server (comigs_jax/federated/servers/pcl.py); this
module scores W on a Simulation's sharded rows (reading it, writing nothing). The U x U pairs
are one jitted program: a `lax.map` over the model offset k of a vmap of `evaluate_user` over the
(sharded, optionally chunked) user axis, so at most U models' activations are alive at once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax import distributed
from comigs_jax.federated import sharding
from comigs_jax.federated.pcl import collaboration_weights, pair_windows
from comigs_jax.train.chunks import chunked
from comigs_jax.train.steps import evaluate_user


@functools.lru_cache(maxsize=16)
def pair_program(model_cfg, seq_len: int, batch: int, mesh, chunk: int):
    """(params [R], base, tokens [R, N], starts [R, W], weights [R, W], masks [R, E], sources [K, R])
    -> (ce_sum, weight) [K, R, W / batch]: for each k, row i scores model sources[k, i] (its
    params and expert mask) on its own windows: a lax.map over k of a vmap over the user axis."""
    fn = functools.partial(evaluate_user, model_cfg=model_cfg, seq_len=seq_len, batch=batch)
    vfn = jax.vmap(fn, in_axes=(0, None, 0, 0, 0, 0))
    users = sharding.user_sharded(mesh)
    run = chunked(lambda base, carry, xs: (carry, vfn(xs[0], base, *xs[1:])), mesh, chunk) if chunk else None

    def program(params, base, tokens, starts, weights, masks, sources):
        def one_offset(src):
            p = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: jnp.take(x, src, axis=0), params), users)
            m = jax.lax.with_sharding_constraint(jnp.take(masks, src, axis=0), users)
            out = vfn(p, base, tokens, starts, weights, m) if run is None else \
                run(base, (), (p, tokens, starts, weights, m))[1]
            return out["ce_sum"], out["weight"]

        return jax.lax.map(one_offset, sources)

    return jax.jit(program)


def pair_perplexities(sim, round_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(ppl [R, R], allowed [R, R]) for the Simulation's rows: ppl[i, j] = exp(token-mean CE of
    row j's current model on row i's validation windows), for j in i's federation (allowed);
    elsewhere inf. A collective: every process calls it."""
    lay, pcl, tc = sim.layout, sim.method.pcl, sim.tc
    n_rows, per = lay.n_rows, lay.models_per_federation
    fed, idx, real = lay.federation_of_rows(), lay.index_of_rows(), np.asarray(lay.real)
    lengths = distributed.to_host(sim.data["valid_len"])
    batch = tc.batch_size
    seeds = np.asarray(sim.seeds)[fed]
    starts = pair_windows(np.where(real, lengths, tc.seq_len + 1), tc.seq_len, pcl.batches * batch, seeds,
                          round_index, np.where(real, idx, 0))
    rows = lay.local_rows
    place = lay.place
    weights = np.ones(starts.shape, np.float32)
    # sources[k, i]: the model row that row i scores at offset k (padding rows score themselves)
    sources = np.where(real[None, :], fed[None, :] * per + np.arange(per)[:, None], np.arange(n_rows)[None, :])
    program = pair_program(sim.model_cfg, tc.seq_len, batch, sim.mesh, lay.model_chunk)
    ce_sum, w = program(sim.states.params, sim.base, sim.data["valid"], place(starts[rows]), place(weights[rows]),
                        sim.masks_dev, jax.device_put(jnp.asarray(sources, jnp.int32), lay.replicated))
    ce_sum = distributed.to_host(ce_sum).astype(np.float64).sum(-1)  # [K, R]
    w = distributed.to_host(w).astype(np.float64).sum(-1)
    ppl_k = np.exp(ce_sum / (w * tc.seq_len))
    ppl = np.full((n_rows, n_rows), np.inf)
    allowed = np.zeros((n_rows, n_rows), bool)
    for k in range(per):
        ok = real & real[sources[k]]
        ppl[np.flatnonzero(ok), sources[k][ok]] = ppl_k[k][ok]
        allowed[np.flatnonzero(ok), sources[k][ok]] = True
    return ppl, allowed


def mixing_inputs(sim, round_index: int):
    """(W [R, R] replicated, {"round": round_index + 1, "ppl": [F][U][U], "weights": [F][U][U]}):
    PCL's mixing matrix from every (model, data) pair's validation perplexity, and the round's
    record (real users; lists for JSON). The mix itself is the PCL server's (federated/servers/pcl.py)."""
    ppl, allowed = pair_perplexities(sim, round_index)
    w = collaboration_weights(ppl, allowed)
    per, n_feds = sim.layout.models_per_federation, sim.n_federations
    block = lambda a, f: a[f * per:(f + 1) * per, f * per:(f + 1) * per].tolist()
    report = {"round": round_index + 1, "ppl": [block(ppl, f) for f in range(n_feds)],
              "weights": [block(w, f) for f in range(n_feds)]}
    return jax.device_put(jnp.asarray(w, jnp.float32), sim.layout.replicated), report
