"""The host side of a federated run: place users on devices, run rounds, aggregate, evaluate.

    sim = Simulation(model_cfg, tc, method, base, train, valid, expert_counts=[2, 2, 2, 2])
    for r in range(sim.n_rounds):
        metrics = sim.run_round()        # jit(vmap(scan)): every user's local steps
        ... evaluate the local (pre-aggregation) models here, as the reference ...
        sim.aggregate()                  # jitted masked mean of the shared leaves

All per-user arrays carry a leading user axis padded to a multiple of the device count (the
`Layout`, comigs_jax.federated.layout); padding users compute like real users but weigh nothing
in aggregation and are dropped from every output.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax import distributed
from comigs_jax.federated import sharding
from comigs_jax.federated.aggregate import aggregate, aggregation_weights
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.methods import Method, configure_model
from comigs_jax.federated.users import expert_masks
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.chunks import chunked
from comigs_jax.train.rounds import loop_round, vmap_round
from comigs_jax.train.state import TrainConfig, init_states_unjitted
from comigs_jax.train.evaluation import eval_windows, full_window_counts
from comigs_jax.train.steps import evaluate_user

MODES = ("vmap", "loop")


class Simulation:
    """U users of one method, trained as one array program.

    train / valid: per-user 1-D token arrays of the users `user_indices` (default: every user).
    layout: where the users live (default: every user on one device; its `pooled` must match the
    method's). expert_counts: experts per user (None: all model_cfg.moe.n_experts). mode: "vmap"
    (one program for all users, sharded over the layout's mesh) or "loop" (the same round per
    user in a Python loop). weighting: "uniform" (the reference) or "tokens" (by training-set
    size). participation: fraction of users that train in a round (sampled per round with the
    run's seed; 1.0 = all).
    """

    def __init__(self, model_cfg: ModelConfig, tc: TrainConfig, method: Method, base: dict,
                 train: Sequence[np.ndarray], valid: Sequence[np.ndarray], *,
                 layout: Optional[Layout] = None, expert_counts: Optional[Sequence[int]] = None, seed: int = 0,
                 mode: str = "vmap", weighting: str = "uniform", participation: float = 1.0,
                 user_indices: Optional[Sequence[int]] = None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: allowed {MODES}")
        method = method.for_mode(tc.faithful)  # FFA-LoRA / FedSA-LoRA as the reference (D4, D5) in faithful mode
        if weighting not in ("uniform", "tokens"):
            raise ValueError(f"weighting={weighting!r}: allowed ('uniform', 'tokens')")
        if not 0.0 < participation <= 1.0:
            raise ValueError(f"participation={participation}: must be in (0, 1]")
        if layout is None:
            layout = Layout(len(train), sharding.single_device_mesh(), method.pooled_data)
        if layout.pooled != method.pooled_data:
            raise ValueError(f"layout.pooled={layout.pooled} for method {method.name!r} "
                             f"(pooled_data={method.pooled_data})")
        self.layout = layout
        self.model_cfg = configure_model(model_cfg, method)
        moe = self.model_cfg.moe
        self.n_users = layout.n_users
        self.user_indices = list(range(self.n_users)) if user_indices is None else list(user_indices)
        if len(self.user_indices) != len(train) or len(train) != len(valid):
            raise ValueError(f"{len(train)} train and {len(valid)} valid splits for {len(self.user_indices)} users")
        counts = list(expert_counts) if expert_counts is not None else [moe.n_experts] * self.n_users
        if len(counts) != self.n_users:
            raise ValueError(f"expert_counts has {len(counts)} entries for {self.n_users} users")
        for c in counts:
            if not max(moe.n_generalists, 1) <= c <= moe.n_experts:
                raise ValueError(f"expert count {c}: must be in [max(n_generalists, 1)={max(moe.n_generalists, 1)}, "
                                 f"n_experts={moe.n_experts}]")
        self.expert_counts = counts
        self.method, self.mode, self.mesh = method, mode, layout.mesh
        self.participation, self.weighting = participation, weighting
        self.n_rounds, self.steps_per_round = tc.rounds, tc.local_steps
        self.tc = tc
        for name, split in (("train", train), ("valid", valid)):
            for i, a in zip(self.user_indices, split):
                if len(a) < tc.seq_len + 1:
                    raise ValueError(f"user {i}: {name} split has {len(a)} tokens, fewer than one window "
                                     f"(seq_len + 1 = {tc.seq_len + 1})")
        if method.pooled_data:  # one model on the union of the users' data, batch x U
            counts = [max(counts)]
            tc = self.tc = _replace(tc, batch_size=tc.batch_size * self.n_users)
        self.n_padded = layout.n_rows
        self.local_rows = layout.local_rows
        self.real = layout.real
        self.masks = expert_masks(counts, moe.n_experts, self.n_padded)
        self.n_shared_specialists = max(min(counts) - moe.n_generalists, 0)
        # every process agrees on the token dtype, even one given no user (only padding rows)
        self.token_dtype = distributed.global_result_type([a.dtype for a in (*train, *valid)])
        self.data = {}
        for name, split in (("train", train), ("valid", valid)):
            self.data[name], self.data[f"{name}_len"] = self._place_rows(self._model_rows(split))
        self._rng = np.random.default_rng(seed + 1)
        self.round_index = 0

        key = jax.random.PRNGKey(seed)
        init, self._round, self._aggregate = _programs(self.model_cfg, tc, method, self.steps_per_round,
                                                       self.n_padded, self.n_shared_specialists, layout.mesh, mode,
                                                       layout.model_chunk)
        self.base = jax.device_put(base, layout.replicated)
        self.states = init(key)
        self.masks_dev = jax.device_put(jnp.asarray(self.masks), layout.users)
        self.active = np.ones(self.n_padded, bool)

    # ------------------------------------------------------------------ data placement
    def _model_rows(self, split: Sequence[np.ndarray]) -> dict:
        """{row: tokens} for this process's rows of the (padded) model axis. Padding rows get a
        dummy window of zeros; Centralized's one model gets every user's tokens, concatenated."""
        given = dict(zip(self.user_indices, split))
        dummy = np.zeros(self.tc.seq_len + 1, self.token_dtype)
        rows = {}
        for r in self.local_rows:
            if not self.real[r]:
                rows[r] = dummy
            elif self.method.pooled_data:
                missing = sorted(set(range(self.n_users)) - set(given))
                if missing:
                    raise ValueError(f"Centralized pools every user's data; users {missing[:5]} were not given")
                rows[r] = np.concatenate([given[u] for u in range(self.n_users)])
            elif r not in given:
                raise ValueError(f"user {r} lives on this process's devices but its data was not given")
            else:
                rows[r] = given[r]
        return rows

    def _place_rows(self, arrays: dict, user_axis: bool = False):
        """(tokens [rows, N], lengths [rows]) as global arrays split over users, built from this
        process's rows of the model axis (or the user axis) only; N is the longest over all processes."""
        rows = self.layout.local_user_rows if user_axis else self.layout.local_rows
        n = distributed.global_max(max(len(a) for a in arrays.values()))
        block = np.zeros((len(rows), n), self.token_dtype)
        lengths = np.zeros(len(rows), np.int32)
        for i, r in enumerate(rows):
            block[i, : len(arrays[r])], lengths[i] = arrays[r], len(arrays[r])
        return self.layout.place(block, user_axis), self.layout.place(lengths, user_axis)

    # ------------------------------------------------------------------ rounds
    def sample_participants(self) -> np.ndarray:
        """[U_pad] bool: the users that train this round (all, unless participation < 1)."""
        n_real = int(self.real.sum())
        active = np.zeros(self.n_padded, bool)
        k = max(1, int(round(self.participation * n_real)))
        active[self._rng.choice(n_real, k, replace=False) if k < n_real else np.arange(n_real)] = True
        active[~self.real] = True  # padding users compute anyway; they weigh nothing
        return active

    def run_round(self) -> dict:
        """All users' local steps of one round; returns per-user, per-step metrics (real users only)."""
        self.active = self.sample_participants()
        active = jax.device_put(jnp.asarray(self.active), self.layout.users)
        self.states, metrics = self._round(self.base, self.states, self.data, self.masks_dev, active)
        self.round_index += 1
        return jax.tree.map(lambda x: distributed.to_host(x)[self.real], metrics)

    def aggregate(self) -> None:
        """Average the method's shared leaves over the real users that trained this round.

        A no-op for one-round methods (synchronised at round 0 only)."""
        if self.method.one_round:
            return
        real, active = jax.device_put((jnp.asarray(self.real), jnp.asarray(self.active)), self.layout.users)
        w = aggregation_weights(real, active, self.data["train_len"] if self.weighting == "tokens" else None)
        params = self._aggregate(self.states.params, w)
        self.states = self.states.replace(params=params)

    def host_state(self) -> dict:
        """What lives on the host besides the device state (JSON-able, for checkpoints)."""
        return {"round_index": self.round_index, "rng": self._rng.bit_generator.state}

    def restore_host_state(self, host: dict) -> None:
        self.round_index = host["round_index"]
        self._rng.bit_generator.state = host["rng"]

    # ------------------------------------------------------------------ evaluation
    def _params_per_user(self, n_rows: int) -> dict:
        """[n_rows, ...] trainable params on the users axis (Centralized: its one model, repeated)."""
        if not self.method.pooled_data:
            return self.states.params
        rep = lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x[0], (n_rows,) + x.shape[1:]), p)
        return jax.jit(rep, out_shardings=self.layout.users)(self.states.params)

    def user_params(self, user: int) -> dict:
        """One user's trainable params (no user axis), on every process: a collective, so every
        process must call it (Centralized: its one model)."""
        row = 0 if self.method.pooled_data else user
        return jax.jit(lambda p: jax.tree.map(lambda x: x[row], p),
                       out_shardings=self.layout.replicated)(self.states.params)

    def evaluate(self, splits: Sequence[np.ndarray], n_windows: int, batch: int, protocol: str = "full",
                 seed: int = 0) -> dict:
        """Every real user's current (local) model on its own `splits[i]`, with the windows of
        `protocol` (comigs_jax.train.evaluation; `full` ignores n_windows and seed; the others
        round n_windows up to a multiple of batch).

        Returns numpy arrays: ce [U] (the exact token-mean cross-entropy over the user's scored
        windows, reduced in float64), n_tokens [U] (scored targets), lb [U] and router_prob /
        selection [U, L, E] (batch means weighted by the batch's real windows)."""
        if len(splits) != len(self.user_indices):
            raise ValueError(f"evaluate: {len(splits)} splits for the {len(self.user_indices)} users given")
        # Users (not models: Centralized's one model is scored on every user) on the users axis.
        n_rows, rows = self.layout.n_user_rows, self.layout.local_user_rows
        given = dict(zip(self.user_indices, splits))
        missing = [r for r in rows if r < self.n_users and r not in given]
        if missing:
            raise ValueError(f"evaluate: users {missing[:5]} live on this process's devices but were not given")
        arrays = {r: given[r] if r < self.n_users else np.zeros(self.tc.seq_len + 1, self.token_dtype) for r in rows}
        lengths = np.array([len(arrays[r]) for r in rows])
        counts = full_window_counts(lengths, self.tc.seq_len) if protocol == "full" else np.zeros(1, int)
        starts, weights = eval_windows(protocol, lengths, self.tc.seq_len, n_windows, batch, seed, user_ids=rows,
                                       min_windows=distributed.global_max(int(counts.max())))
        tokens, _ = self._place_rows(arrays, user_axis=True)
        place = lambda a: self.layout.place(a, user_axis=True)
        masks = self.masks if not self.method.pooled_data else np.repeat(self.masks[:1], n_rows, 0)
        program = _eval_program(self.model_cfg, self.tc.seq_len, batch, self.mesh, self.layout.user_chunk)
        out = program(self._params_per_user(n_rows), self.base, tokens, place(starts), place(weights),
                      place(masks[rows]))
        out = jax.tree.map(lambda x: distributed.to_host(x)[: self.n_users], out)
        out = jax.tree.map(lambda x: np.asarray(x, np.float64), out)  # [U, n_batches, ...]
        w = out.pop("weight")
        res = {"ce": out.pop("ce_sum").sum(1) / (w.sum(1) * self.tc.seq_len),
               "n_tokens": (w.sum(1) * self.tc.seq_len).astype(np.int64)}
        for k, v in out.items():  # batch means, weighted by the batch's real windows
            wk = w.reshape(w.shape + (1,) * (v.ndim - 2))
            res[k] = (v * wk).sum(1) / wk.sum(1)
        return res


# The jitted programs of a federation, built once per process for each distinct (configs, shapes,
# mesh): a comparison over seeds, or several Simulations of one config, trace and compile them once.
@functools.lru_cache(maxsize=64)
def _programs(model_cfg: ModelConfig, tc: TrainConfig, method: Method, steps: int, n_rows: int,
              n_shared_specialists: int, mesh, mode: str, chunk: int):
    """(init(key) -> states [n_rows, ...] split over users, round, aggregate); chunk: users per
    chunk on each device in the round (0: all at once)."""
    users = sharding.user_sharded(mesh)
    init = jax.jit(lambda k: init_states_unjitted(model_cfg, tc, method, k, n_rows, n_shared_specialists),
                   out_shardings=users)
    if mode == "vmap":
        round_fn = vmap_round(model_cfg, tc, method, steps, mesh=mesh, user_chunk=chunk)
    else:
        round_fn = loop_round(model_cfg, tc, method, steps)
    agg = functools.partial(aggregate, shared_roles=method.shared_roles, n_shared_specialists=n_shared_specialists,
                            shared_factors=method.shared_factors, frozen=method.frozen)
    # the mean is an all-reduce; the result stays split over users
    return init, round_fn, jax.jit(agg, in_shardings=(users, users), out_shardings=users)


@functools.lru_cache(maxsize=64)
def _eval_program(model_cfg: ModelConfig, seq_len: int, batch: int, mesh, chunk: int):
    """(params [U], base, tokens [U, N], starts [U, W], weights [U, W], masks [U, E]) -> per-user
    batch sums [U, W / batch, ...]; chunk > 0: each device scores its users chunk at a time."""
    fn = functools.partial(evaluate_user, model_cfg=model_cfg, seq_len=seq_len, batch=batch)
    vfn = jax.vmap(fn, in_axes=(0, None, 0, 0, 0, 0))
    if not chunk:
        return jax.jit(vfn)
    run = chunked(lambda base, carry, xs: (carry, vfn(xs[0], base, *xs[1:])), mesh, chunk)
    return jax.jit(lambda params, base, *xs: run(base, (), (params, *xs))[1])


def _replace(tc: TrainConfig, **kw) -> TrainConfig:
    import dataclasses
    return dataclasses.replace(tc, **kw)
