"""The jitted programs of a Simulation, built once per process for each distinct (configs, shapes,
mesh): a comparison over seeds, or several Simulations of one config, trace and compile them once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax.federated import sharding
from comigs_jax.federated.privacy import shared_start
from comigs_jax.federated.server import Server, Setup
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.chunks import chunked
from comigs_jax.train.rounds import loop_round, vmap_round
from comigs_jax.train.state import TrainConfig, init_states_unjitted
from comigs_jax.train.steps import evaluate_user


@functools.lru_cache(maxsize=64)
def init_program(model_cfg: ModelConfig, tc: TrainConfig, method, n_rows: int, n_shared_specialists: int, mesh,
                 n_feds: int, per_fed: int):
    """init(keys [F, 2]) -> states [n_rows, ...] split over users: federation f's first per_fed rows
    initialised from keys[f] as a federation alone (rows f * per_fed + m), the rows past
    F * per_fed copying row 0 (Layout.init_rows_per_federation: with one federation, per_fed =
    n_rows, every row from the one key, as a run alone)."""
    idx = np.where(np.arange(n_rows) < n_feds * per_fed, np.arange(n_rows), 0)

    def init(keys):
        st = jax.vmap(lambda k: init_states_unjitted(model_cfg, tc, method, k, per_fed, n_shared_specialists))(keys)
        return jax.tree.map(lambda x: jnp.take(x.reshape((n_feds * per_fed,) + x.shape[2:]), idx, axis=0), st)

    return jax.jit(init, out_shardings=sharding.user_sharded(mesh))


@functools.lru_cache(maxsize=64)
def round_program(model_cfg: ModelConfig, tc: TrainConfig, method, steps: int, mesh, mode: str, chunk: int):
    """The round: jit(vmap(scan)) of every row (chunk: rows per chunk on each device, 0: all at
    once), or the loop of one row at a time (mode="loop")."""
    if mode == "vmap":
        return vmap_round(model_cfg, tc, method, steps, mesh=mesh, user_chunk=chunk)
    return loop_round(model_cfg, tc, method, steps)


@functools.lru_cache(maxsize=64)
def server_program(server: Server, setup: Setup, mesh, fn: str = "apply"):
    """jit(server.apply with its setup): (params, inputs, state) -> (params, state), the rows
    split over users (the mean over them is an all-reduce); fn="start": jit(server.start),
    (params, state) -> state at round 0."""
    return jax.jit(functools.partial(getattr(server, fn), setup), out_shardings=sharding.user_sharded(mesh))


@functools.lru_cache(maxsize=16)
def rows_program(fn, mesh):
    """jit(fn) with its outputs split over users (a gather, mask or view of the rows)."""
    return jax.jit(fn, out_shardings=sharding.user_sharded(mesh))


@functools.lru_cache(maxsize=16)
def start_program(method, mesh):
    """params -> a copy of their shared leaves (the server value at a round's start), split over users."""
    return jax.jit(functools.partial(shared_start, method), out_shardings=sharding.user_sharded(mesh))


@functools.lru_cache(maxsize=64)
def eval_program(model_cfg: ModelConfig, seq_len: int, batch: int, mesh, chunk: int):
    """(params [U], base, tokens [U, N], starts [U, W], weights [U, W], masks [U, E]) -> per-user
    batch sums [U, W / batch, ...]; chunk > 0: each device scores its users chunk at a time."""
    fn = functools.partial(evaluate_user, model_cfg=model_cfg, seq_len=seq_len, batch=batch)
    vfn = jax.vmap(fn, in_axes=(0, None, 0, 0, 0, 0))
    if not chunk:
        return jax.jit(vfn)
    run = chunked(lambda base, carry, xs: (carry, vfn(xs[0], base, *xs[1:])), mesh, chunk)
    return jax.jit(lambda params, base, *xs: run(base, (), (params, *xs))[1])
