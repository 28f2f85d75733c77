"""The host side of a federated run: place users on devices, run rounds, aggregate, evaluate.

    sim = Simulation(model_cfg, tc, method, base, train, valid, expert_counts=[2, 2, 2, 2])
    for r in range(sim.n_rounds):
        metrics = sim.run_round()        # jit(vmap(scan)): every user's local steps
        ... evaluate the local (pre-aggregation) models here, as the reference ...
        sim.aggregate()                  # jitted masked mean of the shared leaves

All per-user arrays carry a leading user axis padded to a multiple of the device count (the
`Layout`, comigs_jax.federated.layout); padding users compute like real users but weigh nothing
in aggregation and are dropped from every output.

Several independent federations of one config (seeds, and the scalar hyper-parameters that keep
shapes and the schedule: lr, router_lr, lb_weight, weight_decay) run as ONE program:

    sim = Simulation(..., federations=[{"seed": 0}, {"seed": 1, "lr": 1e-3}])

The user axis becomes (federation, user), flattened (rows f * U + u, padded at the end; the
`Layout`'s n_federations); each federation is initialised from its own PRNGKey(seed) and samples
its participants with its own generator, as a Simulation of its own would; aggregation averages
within each federation. Outputs then carry leading [F, U] axes instead of [U].
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
from comigs_jax.federated.pcl import mixes_after
from comigs_jax.federated.users import expert_masks
from comigs_jax.experiment import pcl_mixing
from comigs_jax.experiment.ranked import Ranks, check_ranks
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.chunks import chunked
from comigs_jax.train.rounds import loop_round, vmap_round
from comigs_jax.train.state import ROW_HPARAMS, TrainConfig, init_states_unjitted
from comigs_jax.train.evaluation import eval_windows, full_window_counts
from comigs_jax.train.steps import evaluate_user

MODES = ("vmap", "loop")
FEDERATION_KEYS = ("seed",) + ROW_HPARAMS


def check_federations(federations) -> list[dict]:
    """Validated copies of `federations` (each a dict: "seed" and optional ROW_HPARAMS overrides);
    ValueError (one line) for a key that cannot vary inside one program."""
    out = []
    for i, fed in enumerate(federations):
        fed = dict(fed)
        for k in fed:
            if k not in FEDERATION_KEYS:
                raise ValueError(f"federation {i}: {k!r} cannot differ between federations of one program (it "
                                 f"changes shapes or the schedule); allowed: {', '.join(FEDERATION_KEYS)}; run each "
                                 f"value of {k!r} as its own program")
        if "seed" not in fed:
            raise ValueError(f"federation {i}: no 'seed'")
        fed["seed"] = int(fed["seed"])
        out.append(fed)
    if not out:
        raise ValueError("federations: at least one federation is needed")
    return out


class Simulation:
    """U users of one method, trained as one array program.

    train / valid: per-user 1-D token arrays of the users `user_indices` (default: every user).
    layout: where the users live (default: every user on one device; its `pooled` must match the
    method's). expert_counts: experts per user (None: all model_cfg.moe.n_experts). mode: "vmap"
    (one program for all users, sharded over the layout's mesh) or "loop" (the same round per
    user in a Python loop). weighting: "uniform" (the reference) or "tokens" (by training-set
    size). participation: fraction of users that train in a round (sampled per round with the
    run's seed; 1.0 = all). dropout: the probability that a participating user drops out of a
    round at a uniformly random local step s in [0, steps): it keeps its first s steps and does not
    upload (aggregation weight 0 that round); drawn per round after the participants, from the
    same generator (0 draws nothing: the run without drop-outs). federations: None (one federation: `seed`, tc's hyper-parameters) or
    F dicts {"seed": int, and optionally lr / router_lr / lb_weight / weight_decay} run as one
    program (the layout's n_federations must be F); `seed` is then ignored. ranks: each user's
    expert LoRA rank, at most model_cfg.moe.lora.rank (the padded rank every row holds; None: that
    rank for all); the rank masks and the method's server rule are comigs_jax.experiment.ranked's.
    """

    def __init__(self, model_cfg: ModelConfig, tc: TrainConfig, method: Method, base: dict,
                 train: Sequence[np.ndarray], valid: Sequence[np.ndarray], *,
                 layout: Optional[Layout] = None, expert_counts: Optional[Sequence[int]] = None, seed: int = 0,
                 mode: str = "vmap", weighting: str = "uniform", participation: float = 1.0,
                 dropout: float = 0.0, user_indices: Optional[Sequence[int]] = None, federations: Optional[Sequence[dict]] = None,
                 ranks: Optional[Sequence[int]] = None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: allowed {MODES}")
        method = method.for_mode(tc.faithful)  # FFA-LoRA / FedSA-LoRA as the reference (D4, D5) in faithful mode
        if weighting not in ("uniform", "tokens"):
            raise ValueError(f"weighting={weighting!r}: allowed ('uniform', 'tokens')")
        if not 0.0 < participation <= 1.0:
            raise ValueError(f"participation={participation}: must be in (0, 1]")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: must be in [0, 1)")
        if method.pcl is not None and dropout > 0:
            raise ValueError(f"dropout={dropout}: method {method.name} (PCL) mixes every user's model; "
                             "only dropout=0 is supported")
        if method.pcl is not None and participation < 1.0:
            raise ValueError(f"participation={participation}: method {method.name} (PCL) mixes every user's model; "
                             "only participation=1 is supported")
        feds = check_federations(federations) if federations is not None else [{"seed": int(seed)}]
        n_feds = len(feds)
        if layout is None:
            layout = Layout(len(train), sharding.single_device_mesh(), method.pooled_data, n_federations=n_feds)
        if layout.n_federations != n_feds:
            raise ValueError(f"layout.n_federations={layout.n_federations} for {n_feds} federations")
        # hyper-parameters equal in every federation stay static; those that differ become per-row values
        row_hparams = {}
        for name in ROW_HPARAMS:
            values = [float(f.get(name, getattr(tc, name))) for f in feds]
            if len(set(values)) > 1:
                row_hparams[name] = np.asarray(values, np.float32)
            elif values[0] != getattr(tc, name):
                tc = _replace(tc, **{name: values[0]})
        self.federations, self.n_federations, self.seeds = feds, n_feds, [f["seed"] for f in feds]
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
        if ranks is not None:  # before any compile: a rank list of the wrong length, a rank over the padded rank
            check_ranks(ranks, self.n_users, moe.lora.rank)
        self.method, self.mode, self.mesh = method, mode, layout.mesh
        self.participation, self.weighting, self.dropout = participation, weighting, float(dropout)
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
        self.masks = expert_masks(counts * n_feds, moe.n_experts, self.n_padded)
        self.n_shared_specialists = max(min(counts) - moe.n_generalists, 0)
        # every process agrees on the token dtype, even one given no user (only padding rows)
        self.token_dtype = distributed.global_result_type([a.dtype for a in (*train, *valid)])
        self.data = {}
        for name, split in (("train", train), ("valid", valid)):
            self.data[name], self.data[f"{name}_len"] = self._place_rows(self._model_rows(split))
        fed_rows = layout.federation_of_rows()
        if row_hparams:  # per-row overrides of the static TrainConfig (comigs_jax.train.steps)
            self.data["hparams"] = {k: layout.place(v[fed_rows[self.local_rows]]) for k, v in row_hparams.items()}
        self.row_hparams = row_hparams
        self._rngs = [np.random.default_rng(s + 1) for s in self.seeds]
        self._rng = self._rngs[0]
        self.round_index = 0

        init, self._round, self._aggregate = _programs(self.model_cfg, tc, method, self.steps_per_round,
                                                       self.n_padded, self.n_shared_specialists, layout.mesh, mode,
                                                       layout.model_chunk, n_feds, layout.models_per_federation)
        self.base = jax.device_put(base, layout.replicated)
        if n_feds == 1:
            self.states = init(jax.random.PRNGKey(self.seeds[0]))
        else:
            self.states = init(jnp.stack([jax.random.PRNGKey(s) for s in self.seeds]))
            self.groups_dev = jax.device_put(jnp.asarray(fed_rows), layout.users)
        self.masks_dev = jax.device_put(jnp.asarray(self.masks), layout.users)
        self.active = np.ones(self.n_padded, bool)  # the users that uploaded in the last round
        self.steps_made = np.full(self.n_padded, self.steps_per_round, np.int32)  # ... and their local steps
        # per-user LoRA ranks of the experts (comigs_jax.experiment.ranked): with `ranks` or a rank-aware server
        self.ranks = Ranks(self, ranks) if ranks is not None or method.server != "mean" else None
        self.last_mixing = None

    # ------------------------------------------------------------------ data placement
    def _model_rows(self, split: Sequence[np.ndarray]) -> dict:
        """{row: tokens} for this process's rows of the (padded) model axis. Padding rows get a
        dummy window of zeros; Centralized's one model gets every user's tokens, concatenated."""
        given = dict(zip(self.user_indices, split))
        dummy = np.zeros(self.tc.seq_len + 1, self.token_dtype)
        rows = {}
        for r in self.local_rows:
            u = r % self.n_users  # the row's user in its federation (every federation has the same users)
            if not self.real[r]:
                rows[r] = dummy
            elif self.method.pooled_data:
                missing = sorted(set(range(self.n_users)) - set(given))
                if missing:
                    raise ValueError(f"Centralized pools every user's data; users {missing[:5]} were not given")
                rows[r] = np.concatenate([given[u] for u in range(self.n_users)])
            elif u not in given:
                raise ValueError(f"user {u} lives on this process's devices but its data was not given")
            else:
                rows[r] = given[u]
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
        """[U_pad] bool: the users that train this round (all, unless participation < 1); each
        federation samples its own with its own generator."""
        n_real = self.layout.models_per_federation
        active = np.zeros(self.n_padded, bool)
        k = max(1, int(round(self.participation * n_real)))
        for f, rng in enumerate(self._rngs):
            active[f * n_real + (rng.choice(n_real, k, replace=False) if k < n_real else np.arange(n_real))] = True
        active[~self.real] = True  # padding users compute anyway; they weigh nothing
        return active

    def sample_dropouts(self, participants: np.ndarray) -> np.ndarray:
        """[U_pad] int32: the local steps each user makes this round: all for a participant that
        stays, a uniform s in [0, steps) for one that drops out (probability `dropout`), 0 for a
        user that sits out; padding rows make all. Each federation draws from its own generator,
        the same number of draws every round (one uniform and one step per real user)."""
        n_real, steps = self.layout.models_per_federation, self.steps_per_round
        made = np.where(participants, steps, 0).astype(np.int32)
        for f, rng in enumerate(self._rngs):
            drop, stop = rng.random(n_real) < self.dropout, rng.integers(0, steps, n_real)
            rows = f * n_real + np.arange(n_real)
            made[rows] = np.where(participants[rows] & drop, stop, made[rows])
        return made

    def _per_federation(self, x: np.ndarray) -> np.ndarray:
        """[F * n, ...] -> [F, n, ...] with several federations (unchanged with one)."""
        return x if self.n_federations == 1 else x.reshape(self.n_federations, -1, *x.shape[1:])

    def run_round(self) -> dict:
        """All users' local steps of one round; returns per-user, per-step metrics (real users only:
        [U, steps, ...], or [F, U, steps, ...] with several federations)."""
        participants = self.sample_participants()
        if self.dropout > 0:  # the program with a per-row step count (comigs_jax.train.rounds.user_round)
            self.steps_made = self.sample_dropouts(participants)
            self.active = self.steps_made == self.steps_per_round  # drop-outs do not upload
            active = jax.device_put(jnp.asarray(self.steps_made), self.layout.users)
        else:
            self.active = participants
            self.steps_made = np.where(participants, self.steps_per_round, 0).astype(np.int32)
            active = jax.device_put(jnp.asarray(self.active), self.layout.users)
        self.states, metrics = self._round(self.base, self.states, self.data, self.masks_dev, active)
        self.round_index += 1
        return jax.tree.map(lambda x: self._per_federation(distributed.to_host(x)[self.real]), metrics)

    def aggregate(self) -> None:
        """Average the method's shared leaves over the real users that trained this round and
        uploaded (`active`: drop-outs do not).

        A no-op for one-round methods (synchronised at round 0 only). PCL methods instead mix
        whole models by validation perplexity after their mixing rounds (federated.pcl); then
        `last_mixing` holds that round's {"round", "ppl", "weights"} (None after other rounds)."""
        self.last_mixing = None
        if self.method.pcl is not None:  # PCL: no server; softmax(-ppl) mixing after some rounds
            if mixes_after(self.method.pcl, self.round_index - 1):
                self.last_mixing = pcl_mixing.mix(self, self.round_index - 1)
            return
        if self.method.one_round:
            return
        # A federation none of whose users uploaded (every participant dropped out) keeps its rows'
        # leaves: both servers leave a group without weight as it is (no mean over no one).
        if self.ranks is not None:  # the expert LoRA by the rank-aware rule (HetLoRA, FlexLoRA, masked mean)
            self.ranks.aggregate(self)
        else:
            real, active = jax.device_put((jnp.asarray(self.real), jnp.asarray(self.active)), self.layout.users)
            w = aggregation_weights(real, active, self.data["train_len"] if self.weighting == "tokens" else None)
            params = self._aggregate(self.states.params, w) if self.n_federations == 1 else \
                self._aggregate(self.states.params, w, self.groups_dev)
            self.states = self.states.replace(params=params)

    def host_state(self) -> dict:
        """What lives on the host besides the device state (JSON-able, for checkpoints)."""
        ranks = self.ranks.host_state() if self.ranks is not None else {}
        if self.n_federations == 1:
            return {"round_index": self.round_index, "rng": self._rng.bit_generator.state, **ranks}
        return {"round_index": self.round_index, "rng": [r.bit_generator.state for r in self._rngs], **ranks}

    def restore_host_state(self, host: dict) -> None:
        self.round_index = host["round_index"]
        if self.ranks is not None:
            self.ranks.restore(self, host)
        states = host["rng"] if self.n_federations > 1 else [host["rng"]]
        for rng, st in zip(self._rngs, states, strict=True):
            rng.bit_generator.state = st

    def federation_states(self, federation: int, layout: Layout):
        """Federation `federation`'s states laid out as its own Simulation on `layout` (one
        federation) would hold them: its rows, padding rows copying its first (they weigh nothing).
        A collective: every process calls it."""
        idx = self.federation_rows(federation, layout)
        take = lambda st: jax.tree.map(lambda x: jnp.take(x, jnp.asarray(idx), axis=0), st)
        return jax.jit(take, out_shardings=layout.users)(self.states)

    def set_federation_states(self, states: Sequence, layout: Layout) -> None:
        """The inverse of federation_states: states[f], federation f's states laid out as its own
        Simulation on `layout` holds them (a restored checkpoint), become its rows here; padding
        rows copy the first federation's first row, as at initialisation. A collective."""
        per, n = self.layout.models_per_federation, layout.n_rows
        if len(states) != self.n_federations:
            raise ValueError(f"set_federation_states: {len(states)} states for {self.n_federations} federations")
        self.federation_rows(0, layout)  # the layout check
        rows = np.arange(self.n_padded)
        idx = np.where(rows < self.n_federations * per, (rows // per) * n + rows % per, 0)
        put = lambda *sts: jax.tree.map(lambda *xs: jnp.take(jnp.concatenate(xs), jnp.asarray(idx), axis=0), *sts)
        self.states = jax.jit(put, out_shardings=self.layout.users)(*states)

    def federation_rows(self, federation: int, layout: Layout) -> np.ndarray:
        """[layout.n_rows]: the rows of this Simulation that federation `federation`'s own run on
        `layout` (one federation) holds, in its order; its padding rows copy its first."""
        per = self.layout.models_per_federation
        if layout.n_federations != 1 or layout.models_per_federation != per:
            raise ValueError(f"federation_states: a layout of one federation of {per} models is needed")
        return federation * per + np.where(np.arange(layout.n_rows) < per, np.arange(layout.n_rows), 0)

    # ------------------------------------------------------------------ evaluation
    def _params_per_user(self, n_rows: int) -> dict:
        """[n_rows, ...] trainable params on the users axis (Centralized: its one model, repeated)."""
        if not self.method.pooled_data:
            return self.states.params if self.ranks is None else self.ranks.model_view(self, self.states.params)
        if self.n_federations > 1:  # user row -> its federation's pooled model
            idx = jnp.asarray(self.layout.federation_of_rows(user_axis=True))
            take = lambda p: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), p)
            return jax.jit(take, out_shardings=self.layout.users)(self.states.params)
        rep = lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x[0], (n_rows,) + x.shape[1:]), p)
        return jax.jit(rep, out_shardings=self.layout.users)(self.states.params)

    def user_params(self, user: int, federation: int = 0) -> dict:
        """One user's trainable params (no user axis), on every process: a collective, so every
        process must call it (Centralized: its one model)."""
        row = federation * self.layout.models_per_federation + (0 if self.method.pooled_data else user)
        params = self.states.params if self.ranks is None else self.ranks.model_view(self, self.states.params)
        return jax.jit(lambda p: jax.tree.map(lambda x: x[row], p), out_shardings=self.layout.replicated)(params)

    def evaluate(self, splits: Sequence[np.ndarray], n_windows: int, batch: int, protocol: str = "full",
                 seed=0) -> dict:
        """Every real user's current (local) model on its own `splits[i]`, with the windows of
        `protocol` (comigs_jax.train.evaluation; `full` ignores n_windows and seed; the others
        round n_windows up to a multiple of batch).

        Returns numpy arrays: ce [U] (the exact token-mean cross-entropy over the user's scored
        windows, reduced in float64), n_tokens [U] (scored targets), lb [U] and router_prob /
        selection [U, L, E] (batch means weighted by the batch's real windows). With several
        federations: [F, U, ...], and seed is one per federation (an int: the same for all)."""
        if len(splits) != len(self.user_indices):
            raise ValueError(f"evaluate: {len(splits)} splits for the {len(self.user_indices)} users given")
        # Users (not models: Centralized's one model is scored on every user) on the users axis.
        n_rows, rows = self.layout.n_user_rows, self.layout.local_user_rows
        n_real = self.layout.n_user_total
        fed, idx = self.layout.federation_of_rows(True)[rows], self.layout.index_of_rows(True)[rows]
        seeds = [seed] * self.n_federations if np.ndim(seed) == 0 else list(seed)
        if len(seeds) != self.n_federations:
            raise ValueError(f"evaluate: {len(seeds)} seeds for {self.n_federations} federations")
        given = dict(zip(self.user_indices, splits))
        missing = sorted({int(u) for r, u in zip(rows, idx) if r < n_real and u not in given})
        if missing:
            raise ValueError(f"evaluate: users {missing[:5]} live on this process's devices but were not given")
        arrays = {r: given[u] if r < n_real else np.zeros(self.tc.seq_len + 1, self.token_dtype)
                  for r, u in zip(rows, idx)}
        lengths = np.array([len(arrays[r]) for r in rows])
        counts = full_window_counts(lengths, self.tc.seq_len) if protocol == "full" else np.zeros(1, int)
        min_windows = distributed.global_max(int(counts.max()))
        parts = [eval_windows(protocol, lengths[fed == f], self.tc.seq_len, n_windows, batch, seeds[f],
                              user_ids=idx[fed == f], min_windows=min_windows) for f in np.unique(fed)]
        starts, weights = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
        tokens, _ = self._place_rows(arrays, user_axis=True)
        place = lambda a: self.layout.place(a, user_axis=True)
        masks = self.masks if not self.method.pooled_data else np.repeat(self.masks[:1], n_rows, 0)
        program = _eval_program(self.model_cfg, self.tc.seq_len, batch, self.mesh, self.layout.user_chunk)
        out = program(self._params_per_user(n_rows), self.base, tokens, place(starts), place(weights),
                      place(masks[rows]))
        out = jax.tree.map(lambda x: distributed.to_host(x)[:n_real], out)
        out = jax.tree.map(lambda x: np.asarray(x, np.float64), out)  # [U, n_batches, ...]
        w = out.pop("weight")
        res = {"ce": out.pop("ce_sum").sum(1) / (w.sum(1) * self.tc.seq_len),
               "n_tokens": (w.sum(1) * self.tc.seq_len).astype(np.int64)}
        for k, v in out.items():  # batch means, weighted by the batch's real windows
            wk = w.reshape(w.shape + (1,) * (v.ndim - 2))
            res[k] = (v * wk).sum(1) / wk.sum(1)
        return {k: self._per_federation(v) for k, v in res.items()}


# The jitted programs of a federation, built once per process for each distinct (configs, shapes,
# mesh): a comparison over seeds, or several Simulations of one config, trace and compile them once.
@functools.lru_cache(maxsize=64)
def _programs(model_cfg: ModelConfig, tc: TrainConfig, method: Method, steps: int, n_rows: int,
              n_shared_specialists: int, mesh, mode: str, chunk: int, n_feds: int = 1, per_fed: int = 0):
    """(init(key) -> states [n_rows, ...] split over users, round, aggregate); chunk: users per
    chunk on each device in the round (0: all at once). n_feds > 1 federations of per_fed models
    each: init(keys [F, 2]) initialises each federation from its own key as a federation alone
    (rows f * per_fed + m; padding rows copy row 0) and aggregate(params, w, groups) averages
    within each federation."""
    users = sharding.user_sharded(mesh)
    if n_feds == 1:
        init = jax.jit(lambda k: init_states_unjitted(model_cfg, tc, method, k, n_rows, n_shared_specialists),
                       out_shardings=users)
    else:
        idx = np.where(np.arange(n_rows) < n_feds * per_fed, np.arange(n_rows), 0)

        def init_feds(keys):
            st = jax.vmap(lambda k: init_states_unjitted(model_cfg, tc, method, k, per_fed, n_shared_specialists))(keys)
            return jax.tree.map(lambda x: jnp.take(x.reshape((n_feds * per_fed,) + x.shape[2:]), idx, axis=0), st)

        init = jax.jit(init_feds, out_shardings=users)
    if mode == "vmap":
        round_fn = vmap_round(model_cfg, tc, method, steps, mesh=mesh, user_chunk=chunk)
    else:
        round_fn = loop_round(model_cfg, tc, method, steps)
    agg = functools.partial(aggregate, shared_roles=method.shared_roles, n_shared_specialists=n_shared_specialists,
                            shared_factors=method.shared_factors, frozen=method.frozen)
    # the mean is an all-reduce; the result stays split over users
    if n_feds == 1:
        return init, round_fn, jax.jit(agg, in_shardings=(users, users), out_shardings=users)
    grouped = lambda params, w, groups: agg(params, w, groups=groups, n_groups=n_feds)
    return init, round_fn, jax.jit(grouped, in_shardings=(users, users, users), out_shardings=users)


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
