"""The host side of a federated run: place users on devices, run rounds, aggregate, evaluate.

    sim = Simulation(model_cfg, tc, method, base, train, valid, expert_counts=[2, 2, 2, 2])
    for r in range(sim.n_rounds):
        metrics = sim.run_round()        # jit(vmap(scan)): every user's local steps
        ... evaluate the local (pre-aggregation) models here, as the reference ...
        sim.aggregate()                  # jitted masked mean of the shared leaves

All per-user arrays carry a leading user axis padded to a multiple of the device count;
padding users compute like real users but weigh nothing in aggregation and are dropped from
every output.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax.federated import sharding
from comigs_jax.federated.aggregate import aggregate, aggregation_weights
from comigs_jax.federated.methods import Method, configure_model
from comigs_jax.federated.users import expert_masks, padded_user_count, real_user_mask, stack_tokens
from comigs_jax.model.config import GPT2Config
from comigs_jax.train.rounds import loop_round, vmap_round
from comigs_jax.train.state import TrainConfig, UserState, init_states
from comigs_jax.train.evaluation import window_starts
from comigs_jax.train.steps import evaluate_user

MODES = ("vmap", "loop")


class Simulation:
    """U users of one method, trained as one array program.

    train / valid: per-user 1-D token arrays. expert_counts: experts per user (None: all
    model_cfg.moe.n_experts). mode: "vmap" (one program for all users; sharded when a mesh is
    given) or "loop" (the same round per user in a Python loop). weighting: "uniform" (the
    reference) or "tokens" (by training-set size). participation: fraction of users that train
    in a round (sampled per round with the run's seed; 1.0 = all).
    """

    def __init__(self, model_cfg: GPT2Config, tc: TrainConfig, method: Method, base: dict,
                 train: Sequence[np.ndarray], valid: Sequence[np.ndarray], *,
                 expert_counts: Optional[Sequence[int]] = None, seed: int = 0, mode: str = "vmap",
                 mesh=None, weighting: str = "uniform", participation: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: allowed {MODES}")
        if weighting not in ("uniform", "tokens"):
            raise ValueError(f"weighting={weighting!r}: allowed ('uniform', 'tokens')")
        if not 0.0 < participation <= 1.0:
            raise ValueError(f"participation={participation}: must be in (0, 1]")
        self.model_cfg = configure_model(model_cfg, method)
        moe = self.model_cfg.moe
        self.n_users = len(train)
        counts = list(expert_counts) if expert_counts is not None else [moe.n_experts] * self.n_users
        if len(counts) != self.n_users:
            raise ValueError(f"expert_counts has {len(counts)} entries for {self.n_users} users")
        for c in counts:
            if not max(moe.n_generalists, 1) <= c <= moe.n_experts:
                raise ValueError(f"expert count {c}: must be in [max(n_generalists, 1)={max(moe.n_generalists, 1)}, "
                                 f"n_experts={moe.n_experts}]")
        self.expert_counts = counts
        self.method, self.mode, self.mesh = method, mode, mesh
        self.participation, self.weighting = participation, weighting
        self.n_rounds, self.steps_per_round = tc.rounds, tc.local_steps
        self.tc = tc
        if method.pooled_data:  # one model on the union of the users' data, batch x U
            train, valid = [np.concatenate(list(train))], [np.concatenate(list(valid))]
            counts = [max(counts)]
            tc = self.tc = _replace(tc, batch_size=tc.batch_size * self.n_users)
        n_models = len(train)
        n_dev = mesh.devices.size if mesh is not None else 1
        self.n_padded = padded_user_count(n_models, n_dev)
        for name, split in (("train", train), ("valid", valid)):
            for i, a in enumerate(split):
                if len(a) < tc.seq_len + 1:
                    raise ValueError(f"user {i}: {name} split has {len(a)} tokens, fewer than one window "
                                     f"(seq_len + 1 = {tc.seq_len + 1})")
        tr, tr_len = stack_tokens(train, self.n_padded)
        va, va_len = stack_tokens(valid, self.n_padded)
        self.real = real_user_mask(n_models, self.n_padded)
        self.masks = expert_masks(counts, moe.n_experts, self.n_padded)
        self.data = {"train": tr, "train_len": tr_len, "valid": va, "valid_len": va_len}
        self.n_train_tokens = tr_len
        self.n_shared_specialists = max(min(counts) - moe.n_generalists, 0)
        states = init_states(self.model_cfg, tc, method, jax.random.PRNGKey(seed), self.n_padded,
                             self.n_shared_specialists)
        self._rng = np.random.default_rng(seed + 1)
        self.round_index = 0

        if mesh is not None:
            self.base = sharding.replicate(base, mesh)
            self.states = sharding.shard_users(states, mesh)
            self.data = sharding.shard_users(self.data, mesh)
            self.masks_dev = sharding.shard_users(jnp.asarray(self.masks), mesh)
        else:
            self.base, self.states = jax.device_put(base), states
            self.data = jax.device_put(self.data)
            self.masks_dev = jnp.asarray(self.masks)
        builder = vmap_round if mode == "vmap" else loop_round
        kwargs = {"mesh": mesh} if mode == "vmap" else {}
        self._round = builder(self.model_cfg, tc, method, self.steps_per_round, **kwargs)
        agg = functools.partial(aggregate, shared_roles=method.shared_roles,
                                n_shared_specialists=self.n_shared_specialists)
        if mesh is None:
            self._aggregate = jax.jit(agg)
        else:  # the mean is an all-reduce; the result stays split over users
            users = sharding.user_sharded(mesh)
            self._aggregate = jax.jit(agg, in_shardings=(users, users), out_shardings=users)
        self._eval_cache = {}
        self.active = np.ones(self.n_padded, bool)

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
        active = jnp.asarray(self.active)
        if self.mesh is not None:
            active = sharding.shard_users(active, self.mesh)
        self.states, metrics = self._round(self.base, self.states, self.data, self.masks_dev, active)
        self.round_index += 1
        return jax.tree.map(lambda x: np.asarray(x)[self.real], metrics)

    def aggregate(self) -> None:
        """Average the method's shared leaves over the real users that trained this round.

        A no-op for one-round methods (synchronised at round 0 only)."""
        if self.method.one_round:
            return
        n_tok = self.n_train_tokens if self.weighting == "tokens" else None
        w = aggregation_weights(jnp.asarray(self.real), jnp.asarray(self.active),
                                None if n_tok is None else jnp.asarray(n_tok))
        if self.mesh is not None:
            w = sharding.shard_users(w, self.mesh)
        params = self._aggregate(self.states.params, w)
        self.states = self.states.replace(params=params)

    def host_state(self) -> dict:
        """What lives on the host besides the device state (JSON-able, for checkpoints)."""
        return {"round_index": self.round_index, "rng": self._rng.bit_generator.state}

    def restore_host_state(self, host: dict) -> None:
        self.round_index = host["round_index"]
        self._rng.bit_generator.state = host["rng"]

    # ------------------------------------------------------------------ evaluation
    def user_params(self) -> dict:
        """[U, ...] trainable params per real user (Centralized: the one model, for every user)."""
        p = jax.tree.map(lambda x: x[: len(self.real)], self.states.params)
        if self.method.pooled_data:
            p = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], (self.n_users,) + x.shape[1:]), p)
        return p

    def evaluate(self, splits: Sequence[np.ndarray], n_windows: int, batch: int, protocol: str = "fixed",
                 seed: int = 0) -> dict:
        """Every real user's current (local) model on its own `splits[i]` (comigs_jax.train.evaluation).

        n_windows is rounded up to a multiple of batch. Returns numpy arrays: ce [U],
        lb [U], router_prob / selection [U, L, E]."""
        if len(splits) != self.n_users:
            raise ValueError(f"evaluate: {len(splits)} splits for {self.n_users} users")
        n_windows = -(-n_windows // batch) * batch
        tokens, lengths = stack_tokens(splits)
        starts = window_starts(protocol, lengths, self.tc.seq_len, n_windows, seed)
        if batch not in self._eval_cache:
            fn = functools.partial(evaluate_user, model_cfg=self.model_cfg, seq_len=self.tc.seq_len, batch=batch)
            self._eval_cache[batch] = jax.jit(jax.vmap(fn, in_axes=(0, None, 0, 0, 0)))
        masks = self.masks[: self.n_users] if not self.method.pooled_data else \
            np.repeat(self.masks[:1], self.n_users, 0)
        out = self._eval_cache[batch](self.user_params(), self.base, jnp.asarray(tokens), jnp.asarray(starts),
                                      jnp.asarray(masks))
        return jax.tree.map(np.asarray, out)


def _replace(tc: TrainConfig, **kw) -> TrainConfig:
    import dataclasses
    return dataclasses.replace(tc, **kw)
