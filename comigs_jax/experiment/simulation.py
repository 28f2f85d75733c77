"""The host side of a federated run: place users on devices, run rounds, aggregate, evaluate.

    sim = Simulation(model_cfg, tc, method, base, train, valid, expert_counts=[2, 2, 2, 2])
    for r in range(sim.n_rounds):
        metrics = sim.run_round()        # jit(vmap(scan)): every user's local steps
        ... evaluate the local (pre-aggregation) models here, as the reference ...
        sim.aggregate()                  # the method's server (comigs_jax.federated.servers)

All per-user arrays carry a leading user axis padded to a multiple of the device count (the
`Layout`, comigs_jax.federated.layout); padding users compute like real users but weigh nothing
in aggregation and are dropped from every output.

Several independent federations of one config (seeds, and the scalar hyper-parameters that keep
shapes and the schedule: lr, router_lr, lb_weight, weight_decay) run as ONE program:

    sim = Simulation(..., federations=[{"seed": 0}, {"seed": 1, "lr": 1e-3}])

The user axis becomes (federation, user), flattened (rows f * U + u, padded at the end; the
`Layout`'s n_federations); each federation is initialised from its own PRNGKey(seed) and samples
its participants with its own generator, as a Simulation of its own would; the server works
within each federation. One federation is the case F = 1; only outputs differ in shape: they
carry leading [F, U] axes with several federations, [U] with one (`Layout.outputs`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax import distributed
from comigs_jax.experiment import programs, server_inputs
from comigs_jax.experiment.sim_evaluation import evaluate_users
from comigs_jax.configuration import FederationConfig, check_federations  # noqa: F401
from comigs_jax.federated import sharding
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.methods import Method, configure_model
from comigs_jax.federated.ranks import apply_rank_scale, mask_ranks
from comigs_jax.federated.server import Rows, Setup, initial_state, round_data
from comigs_jax.federated.servers import server_for
from comigs_jax.federated.users import expert_masks
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import ROW_HPARAMS, TrainConfig


def federation_of(kw: dict) -> FederationConfig:
    """A FederationConfig from Simulation's keywords (seed, federations, mode, weighting,
    participation, dropout, ranks, expert_counts, server_optimizer, sit_out), for callers without a config."""
    kw = dict(kw)
    bad = set(kw) - {"seed", "federations", "mode", "weighting", "participation", "dropout", "ranks", "expert_counts",
                     "server_optimizer", "sit_out", "sampling", "dp"}
    if bad:
        raise TypeError(f"Simulation: unexpected keywords {sorted(bad)}")
    seed, feds = kw.pop("seed", 0), kw.pop("federations", None)
    return FederationConfig(tuple(feds) if feds is not None else ({"seed": int(seed)},), **kw)


class Simulation:
    """U users of one method, trained as one array program.

    train / valid: per-user 1-D token arrays of the users `user_indices` (default: every user).
    fed: how the users federate (configuration.FederationConfig, checked there: the federations
    and their seeds, mode, weighting, participation, drop-outs, ranks, expert counts); without it,
    the same settings as keywords (seed=0, federations=None, mode="vmap", ...; `federation_of`).
    layout: where the users live (default: every user on one device; its `pooled` must match the
    method's, its n_federations the number of federations). With ranks, the expert LoRA of every
    row is held at the padded rank model_cfg.moe.lora.rank and the ranks live in the server state
    (comigs_jax.federated.server.rank_state).
    """

    def __init__(self, model_cfg: ModelConfig, tc: TrainConfig, method: Method, base: dict,
                 train: Sequence[np.ndarray], valid: Sequence[np.ndarray], fed: Optional[FederationConfig] = None, *,
                 layout: Optional[Layout] = None, user_indices: Optional[Sequence[int]] = None, **kw):
        fed = fed if fed is not None else federation_of(kw)
        method = method.for_mode(tc.faithful)  # FFA-LoRA / FedSA-LoRA as the reference (D4, D5) in faithful mode
        feds = [dict(f) for f in fed.federations]
        layout = layout or Layout(len(train), sharding.single_device_mesh(), method.pooled_data,
                                  n_federations=len(feds))
        _check_layout(layout, method, len(feds))
        moe = configure_model(model_cfg, method).moe
        fed.check(method, layout.n_users, moe.n_experts, moe.n_generalists, moe.lora.rank)  # before any compile
        tc, self.row_hparams = _row_hparams(tc, feds)
        self.fed, self.federations, self.n_federations, self.seeds = fed, feds, len(feds), fed.seeds
        self.layout, self.mesh, self.method, self.mode = layout, layout.mesh, method, fed.mode
        self.model_cfg = configure_model(model_cfg, method)
        self.n_users = layout.n_users
        self.user_indices = list(range(self.n_users)) if user_indices is None else list(user_indices)
        if len(self.user_indices) != len(train) or len(train) != len(valid):
            raise ValueError(f"{len(train)} train and {len(valid)} valid splits for {len(self.user_indices)} users")
        self.expert_counts = list(fed.expert_counts or [moe.n_experts] * self.n_users)
        self.participation, self.weighting, self.dropout = fed.participation, fed.weighting, float(fed.dropout)
        self.n_rounds, self.steps_per_round = tc.rounds, tc.local_steps
        self.tc = tc
        _check_split_lengths(self.user_indices, train, valid, tc.seq_len)
        counts = self.expert_counts
        if method.pooled_data:  # one model on the union of the users' data, batch x U
            counts = [max(counts)]
            self.tc = dataclasses.replace(tc, batch_size=tc.batch_size * self.n_users)
        self.n_padded, self.local_rows, self.real = layout.n_rows, layout.local_rows, layout.real
        self.masks = expert_masks(counts * self.n_federations, moe.n_experts, self.n_padded)
        self.n_shared_specialists = max(min(counts) - moe.n_generalists, 0)
        self._place_data(train, valid)
        self._rngs = [np.random.default_rng(s + 1) for s in self.seeds]
        self.round_index = 0
        self.base = jax.device_put(base, layout.replicated)
        mode = fed.mode
        init = programs.init_program(self.model_cfg, self.tc, method, self.n_padded, self.n_shared_specialists,
                                     layout.mesh, self.n_federations, layout.init_rows_per_federation)
        self.states = init(jnp.stack([jax.random.PRNGKey(s) for s in self.seeds]))
        self._round = programs.round_program(self.model_cfg, self.tc, method, self.steps_per_round, layout.mesh,
                                             mode, layout.model_chunk)
        self.groups_dev = jax.device_put(jnp.asarray(layout.federation_of_rows()), layout.users)
        self.masks_dev = jax.device_put(jnp.asarray(self.masks), layout.users)
        self.active = np.ones(self.n_padded, bool)  # the users that uploaded in the last round
        self.steps_made = np.full(self.n_padded, self.steps_per_round, np.int32)  # ... and their local steps
        self._init_server(fed.ranks)
        self.last_mixing = self.round_start = None

    # ------------------------------------------------------------------ set-up
    def _place_data(self, train, valid) -> None:
        """The round's data: tokens and lengths per row, split over users; per-row hyper-parameters."""
        # every process agrees on the token dtype, even one given no user (only padding rows)
        self.token_dtype = distributed.global_result_type([a.dtype for a in (*train, *valid)])
        self.data = {}
        for name, split in (("train", train), ("valid", valid)):
            self.data[name], self.data[f"{name}_len"] = self._place_rows(self._model_rows(split))
        if self.row_hparams:  # per-row overrides of the static TrainConfig (comigs_jax.train.steps)
            fed_rows = self.layout.federation_of_rows()[self.local_rows]
            self.data["hparams"] = {k: self.layout.place(v[fed_rows]) for k, v in self.row_hparams.items()}

    def _init_server(self, ranks) -> None:
        """The method's server, its state at round 0 (per-row ranks when users have them or the
        rule needs them), the rank masks applied to the initial expert LoRA."""
        moe = self.model_cfg.moe
        self.server = server_for(self.method, ranks is not None, self.fed.server_optimizer, self.fed.dp is not None)
        self.setup = Setup(self.method, self.n_shared_specialists, self.n_federations, moe.lora, self.fed.dp)
        full = None
        if ranks is not None or self.server.ranked:
            ranks = list(ranks) if ranks is not None else [moe.lora.rank] * self.n_users
            if self.method.pooled_data and min(ranks) < moe.lora.rank:
                raise ValueError(f"method {self.method.name} pools every user into one model: one rank, not {ranks}")
            rows = ranks * self.n_federations if not self.method.pooled_data else [moe.lora.rank]
            full = np.array(rows + [moe.lora.rank] * (self.n_padded - len(rows)), np.int32)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), self.states.params)
        rows = Rows(self.n_padded, self.layout.federation_of_rows(), tuple(self.federations), full, shapes)
        state = initial_state(self.server, self.setup, rows)
        self.server_state = jax.tree.map(lambda a: self.layout.place(np.asarray(a)[self.local_rows]), state)
        if "ranks" in state:
            mask = programs.rows_program(mask_ranks, self.mesh)
            self.states = self.states.replace(params=mask(self.states.params, self.server_state["ranks"]["scale"]))
        if self.server.start is not None:  # what the rule takes from the round-0 parameters
            start = programs.server_program(self.server, self.setup, self.mesh, "start")
            self.server_state = start(self.states.params, self.server_state)
        self._server = programs.server_program(self.server, self.setup, self.mesh)

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
        federation samples its own with its own generator: k = round(participation x users) of them
        without replacement (sampling "fixed"), or each user with probability participation
        ("poisson": one uniform per user every round; a round may have no participant)."""
        n_real = self.layout.models_per_federation
        active = np.zeros(self.n_padded, bool)
        k = max(1, int(round(self.participation * n_real)))
        for f, rng in enumerate(self._rngs):
            if self.fed.sampling == "poisson":
                active[f * n_real:(f + 1) * n_real] = rng.random(n_real) < self.participation
                continue
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

    def round_data(self) -> dict:
        """What the round program reads: the users' tokens, per-row hyper-parameters and the
        server state's rank scale."""
        return {**self.data, **round_data(self.server_state)}

    def run_round(self, by_federation: bool = False) -> dict:
        """All users' local steps of one round; returns per-user, per-step metrics (real users only:
        [U, steps, ...], or [F, U, steps, ...] with several federations or by_federation)."""
        participants = self.sample_participants()
        steps = self.steps_per_round
        sit_out_trains = self.fed.sit_out == "train"  # users that sit out still make all their local steps
        if self.dropout > 0:  # the program with a per-row step count (comigs_jax.train.rounds.user_round)
            self.steps_made = self.sample_dropouts(participants)
            if sit_out_trains:
                self.steps_made = np.where(participants, self.steps_made, steps).astype(np.int32)
            self.active = participants & (self.steps_made == steps)  # drop-outs and sitting-out users do not upload
            active = jax.device_put(jnp.asarray(self.steps_made), self.layout.users)
        else:
            self.active = participants
            trains = np.ones_like(participants) if sit_out_trains else participants
            self.steps_made = np.where(trains, steps, 0).astype(np.int32)
            active = jax.device_put(jnp.asarray(trains), self.layout.users)
        if self.server.needs_start:  # the server value, copied: the round's program donates the states
            self.round_start = programs.start_program(self.method, self.mesh)(self.states.params)
        self.states, metrics = self._round(self.base, self.states, self.round_data(), self.masks_dev, active)
        self.round_index += 1
        return jax.tree.map(lambda x: self._outputs(distributed.to_host(x)[self.real], by_federation), metrics)

    @property
    def trained(self) -> np.ndarray:
        """[U_pad] bool: the rows that made all their local steps in the last round (those that
        uploaded, plus with federation.sit_out="train" the users that sat out)."""
        return self.steps_made == self.steps_per_round

    def _outputs(self, x: np.ndarray, by_federation: bool) -> np.ndarray:
        return self.layout.by_federation(x) if by_federation else self.layout.outputs(x)

    def aggregate(self) -> None:
        """The method's server after the round that just ran (comigs_jax.federated.servers), when
        its schedule says so: the mean of the shared leaves over the real users that trained and
        uploaded (`active`: drop-outs do not), a rank-aware rule, PCL's mixing (then `last_mixing`
        holds that round's {"round", "ppl", "weights"}; None after other rounds) or nothing
        (one-round methods). A federation none of whose users uploaded keeps its rows' leaves."""
        self.last_mixing = None
        if not self.server.after_round(self.method, self.round_index - 1):
            return
        inputs, self.last_mixing = server_inputs.INPUTS[self.server.inputs](self, self.round_index - 1)
        params, self.server_state = self._server(self.states.params, inputs, self.server_state)
        self.states, self.round_start = self.states.replace(params=params), None

    def current_ranks(self) -> np.ndarray | None:
        """[rows] int32: each row's expert LoRA rank now (HetLoRA's cuts), None without ranks."""
        if "ranks" not in self.server_state:
            return None
        return np.asarray(distributed.to_host(self.server_state["ranks"]["current"]), np.int32)

    def current_module_ranks(self) -> np.ndarray | None:
        """[rows, M] int32: each row's rank per LoRA module (HetLoRA as the reference; order
        comigs_jax.federated.ranks.module_layout), None where the server keeps no such ranks."""
        if "module_ranks" not in self.server_state:
            return None
        return np.asarray(distributed.to_host(self.server_state["module_ranks"]), np.int32)

    # ------------------------------------------------------------------ checkpoints
    def host_states(self, layout: Layout) -> list[dict]:
        """Each federation's host state (JSON) as its own run on `layout` (one federation) checkpoints
        it: the round, its participation sampler and, with ranks, its rows' current ranks."""
        ranks = self.current_ranks()
        out = []
        for f, rng in enumerate(self._rngs):
            host = {"round_index": self.round_index, "rng": rng.bit_generator.state}
            if ranks is not None:
                host["ranks"] = [int(ranks[i]) for i in self.federation_rows(f, layout)]
            out.append(host)
        return out

    def restore_host_states(self, hosts: Sequence[dict], layout: Layout) -> None:
        """The inverse of host_states: hosts[f], federation f's host state as its own run on `layout`
        wrote it, becomes its round, sampler and ranks here."""
        if len(hosts) != self.n_federations:
            raise ValueError(f"restore_host_states: {len(hosts)} host states for {self.n_federations} federations")
        self.round_index = hosts[0]["round_index"]
        for rng, host in zip(self._rngs, hosts):
            rng.bit_generator.state = host["rng"]
        ranks = self.current_ranks()
        if ranks is None:
            return
        ranks = ranks.copy()
        n = self.n_padded if layout is self.layout else self.layout.models_per_federation
        for f, host in enumerate(hosts):
            if "ranks" in host:
                rows = self.federation_rows(f, layout)[:n]
                ranks[rows] = np.asarray(host["ranks"])[:len(rows)]
        rk = self.server_state["ranks"]
        current = self.layout.place(ranks[self.local_rows])
        self.server_state = {**self.server_state, "ranks": programs.rows_program(_with_current, self.mesh)(rk, current)}

    def _saved(self):
        """What a checkpoint holds of the device state: the users' states, and with them the server
        state's `saved` keys when it has any (a server without them: the users' states alone, the
        checkpoints written before the server interface)."""
        if not self.server.saved:
            return self.states
        return {"states": self.states, "server": {k: self.server_state[k] for k in self.server.saved}}

    def _restore_saved(self, tree) -> None:
        if not self.server.saved:
            self.states = tree
            return
        self.states, self.server_state = tree["states"], {**self.server_state, **tree["server"]}

    def federation_states(self, federation: int, layout: Layout):
        """Federation `federation`'s states (and its server's saved state) laid out as its own
        Simulation on `layout` (one federation) would hold them: its rows, padding rows copying
        its first (they weigh nothing). A collective: every process calls it."""
        if layout is self.layout:  # a run alone on its own layout: its states as they are
            return self._saved()
        idx = self.federation_rows(federation, layout)
        take = lambda st: jax.tree.map(lambda x: jnp.take(x, jnp.asarray(idx), axis=0), st)
        return jax.jit(take, out_shardings=layout.users)(self._saved())

    def set_federation_states(self, states: Sequence, layout: Layout) -> None:
        """The inverse of federation_states: states[f], federation f's states laid out as its own
        Simulation on `layout` holds them (a restored checkpoint), become its rows here; padding
        rows copy the first federation's first row, as at initialisation. A collective."""
        per, n = self.layout.models_per_federation, layout.n_rows
        if len(states) != self.n_federations:
            raise ValueError(f"set_federation_states: {len(states)} states for {self.n_federations} federations")
        if layout is self.layout:
            self._restore_saved(states[0])
            return
        self.federation_rows(0, layout)  # the layout check
        rows = np.arange(self.n_padded)
        idx = np.where(rows < self.n_federations * per, (rows // per) * n + rows % per, 0)
        put = lambda *sts: jax.tree.map(lambda *xs: jnp.take(jnp.concatenate(xs), jnp.asarray(idx), axis=0), *sts)
        self._restore_saved(jax.jit(put, out_shardings=self.layout.users)(*states))

    def federation_rows(self, federation: int, layout: Layout) -> np.ndarray:
        """[layout.n_rows]: the rows of this Simulation that federation `federation`'s own run on
        `layout` (one federation) holds, in its order; its padding rows copy its first (every row
        as it is when `layout` is this Simulation's own)."""
        if layout is self.layout:
            return np.arange(self.n_padded)
        per = self.layout.models_per_federation
        if layout.n_federations != 1 or layout.models_per_federation != per:
            raise ValueError(f"federation_states: a layout of one federation of {per} models is needed")
        return federation * per + np.where(np.arange(layout.n_rows) < per, np.arange(layout.n_rows), 0)

    # ------------------------------------------------------------------ evaluation
    def model_params(self) -> dict:
        """Every row's trainable params as the model sees them (with ranks: A times the row's rank
        scale, B masked; comigs_jax.federated.ranks.apply_rank_scale)."""
        if "ranks" not in self.server_state:
            return self.states.params
        view = programs.rows_program(apply_rank_scale, self.mesh)
        return view(self.states.params, self.server_state["ranks"]["scale"])

    def user_params(self, user: int, federation: int = 0) -> dict:
        """One user's trainable params (no user axis), on every process: a collective, so every
        process must call it (Centralized: its one model)."""
        row = federation * self.layout.models_per_federation + (0 if self.method.pooled_data else user)
        return jax.jit(lambda p: jax.tree.map(lambda x: x[row], p),
                       out_shardings=self.layout.replicated)(self.model_params())

    def evaluate(self, splits: Sequence[np.ndarray], n_windows: int, batch: int, protocol: str = "full",
                 seed=0, by_federation: bool = False) -> dict:
        """Every real user's current (local) model on its own `splits[i]`, with the windows of
        `protocol` (comigs_jax.train.evaluation; `full` ignores n_windows and seed; the others
        round n_windows up to a multiple of batch).

        Returns numpy arrays: ce [U] (the exact token-mean cross-entropy over the user's scored
        windows, reduced in float64), n_tokens [U] (scored targets), lb [U] and router_prob /
        selection [U, L, E] (batch means weighted by the batch's real windows). With several
        federations (or by_federation): [F, U, ...], and seed is one per federation (an int: the
        same for all)."""
        res = evaluate_users(self, splits, n_windows, batch, protocol, seed)
        return {k: self._outputs(v, by_federation) for k, v in res.items()}


def _with_current(ranks: dict, current):
    from comigs_jax.federated.server import with_current
    return with_current(ranks, current)


def _check_layout(layout: Layout, method: Method, n_feds: int) -> None:
    if layout.n_federations != n_feds:
        raise ValueError(f"layout.n_federations={layout.n_federations} for {n_feds} federations")
    if layout.pooled != method.pooled_data:
        raise ValueError(f"layout.pooled={layout.pooled} for method {method.name!r} "
                         f"(pooled_data={method.pooled_data})")


def _row_hparams(tc: TrainConfig, feds: list[dict]) -> tuple[TrainConfig, dict]:
    """(tc with the hyper-parameters every federation shares, {name: [F] values} of those that
    differ: per-row values of the round program)."""
    row_hparams = {}
    for name in ROW_HPARAMS:
        values = [float(f.get(name, getattr(tc, name))) for f in feds]
        if len(set(values)) > 1:
            row_hparams[name] = np.asarray(values, np.float32)
        elif values[0] != getattr(tc, name):
            tc = dataclasses.replace(tc, **{name: values[0]})
    return tc, row_hparams


def _check_split_lengths(user_indices, train, valid, seq_len: int) -> None:
    for name, split in (("train", train), ("valid", valid)):
        for i, a in zip(user_indices, split):
            if len(a) < seq_len + 1:
                raise ValueError(f"user {i}: {name} split has {len(a)} tokens, fewer than one window "
                                 f"(seq_len + 1 = {seq_len + 1})")
