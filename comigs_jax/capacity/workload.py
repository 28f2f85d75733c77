"""The bench's workload: one model size at one U, built once from a configs/bench.py workload
(through comigs_jax.configuration.engine_configs, as the capacity model builds its configs), and
each mode's round program and placed inputs (the vmapped modes through the training loop's Layout)."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from comigs_jax import configuration
from comigs_jax.capacity.flops import round_flops
from comigs_jax.errors import ConfigError
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.roles import split_base
from comigs_jax.federated.sharding import single_device_mesh, users_mesh
from comigs_jax.federated.users import stack_tokens
from comigs_jax.model.lm import ModelConfig, init_params
from comigs_jax.train.rounds import loop_round, loop_step_round, vmap_round
from comigs_jax.train.state import TrainConfig, init_states

MODES = ("loop_step", "loop_round", "vmap", "vmap_sharded")
LOOP_MODES = ("loop_step", "loop_round")


def _ints(s) -> list[int]:
    if isinstance(s, int):
        return [s]
    return [int(x) for x in str(s).replace("(", "").replace(")", "").split(",") if x.strip()]


def _names(s) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _users_key(model: str) -> str:
    """The key of a workload's U list: the tiny sweep's is top-level `users`, the others' `<model>.users`."""
    return "users" if model == "tiny" else f"{model}.users"


def _users_of(cfg: ConfigDict, model: str) -> str:
    return cfg.users if model == "tiny" else cfg[model].users


@dataclasses.dataclass
class Workload:
    """One model size at one U: everything a mode needs, built once and shared by all modes.
    `chunk`: train.user_chunk of the vmapped modes (0 = all of a device's users at once)."""

    name: str
    model_cfg: ModelConfig
    tc: TrainConfig
    method: object
    steps: int
    n_users: int
    base: dict
    states0: object
    data: dict
    masks: jax.Array
    active: jax.Array
    chunk: int = 0

    @property
    def tokens_per_round(self) -> int:
        """Training tokens of the expert steps of all users (router steps not counted; nor padding rows)."""
        return self.n_users * self.steps * self.tc.batch_size * self.tc.seq_len


def workload_configs(name: str, mc: ConfigDict, method_name: str, dtype: str, remat: str = "none"
                     ) -> tuple[ModelConfig, TrainConfig, object]:
    """(model config, train config, method) of workload `name` of configs/bench.py in `dtype`
    with `remat` (the bench's model.remat), through comigs_jax.configuration.engine_configs (as
    comigs_jax.capacity builds them). ConfigError (one line, the key as `config.<name>.<key>`)
    for a value that is not allowed. vocab_size 0 is the named base's own (configuration.base_shape)."""
    wc = ConfigDict(mc.to_dict())
    wc.model.dtype = dtype
    wc.model.remat = remat
    try:
        model_cfg, tc, method = configuration.engine_configs(wc, method_name)
        if tc.local_steps % tc.router_every:
            raise ConfigError(f"config.train.local_steps={tc.local_steps} is not allowed: a multiple of "
                              f"train.router_every={tc.router_every} (every round the same router phases)")
    except ConfigError as e:  # the workload's keys live under config.<name>
        raise ConfigError(str(e).replace("config.", f"config.{name}.", 1)) from None
    return model_cfg, tc, method


def build_workload(name: str, mc: ConfigDict, n_users: int, method_name: str, dtype: str, seed: int,
                   base: dict | None = None, remat: str = "none", chunk: int = 0) -> Workload:
    cfg, tc, method = workload_configs(name, mc, method_name, dtype, remat)
    if base is None:
        base = split_base(init_params(cfg.base, jax.random.key(seed)))[0]
    rng = np.random.default_rng(seed)
    tok = np.uint16 if cfg.vocab_size <= 2**16 else np.int32
    train = [rng.integers(0, cfg.vocab_size, mc.train_tokens).astype(tok) for _ in range(n_users)]
    valid = [rng.integers(0, cfg.vocab_size, mc.valid_tokens).astype(tok) for _ in range(n_users)]
    (tr, tr_len), (va, va_len) = stack_tokens(train), stack_tokens(valid)
    del train, valid
    data = jax.device_put({"train": tr, "train_len": tr_len, "valid": va, "valid_len": va_len})
    states0 = init_states(cfg, tc, method, jax.random.PRNGKey(seed), n_users, cfg.moe.n_specialists)
    return Workload(name, cfg, tc, method, tc.local_steps, n_users, base, states0, data,
                    jnp.ones((n_users, cfg.moe.n_experts), bool), jnp.ones((n_users,), bool), chunk)


def workload_flops(w: Workload) -> dict:
    """FLOPs of one round of all users: U x comigs_jax.capacity.round_flops (the one count; padding
    rows are not work)."""
    f = round_flops(w.model_cfg, w.tc, w.method, w.steps)
    return {"expert_step": f["expert_step"], "router_step": f["router_step"], "round": w.n_users * f["per_user"]}


def mode_layout(mode: str, n_users: int, chunk: int = 0) -> Layout | None:
    """The Layout a vmapped mode runs its users on (None for the loop modes): `vmap` one device,
    `vmap_sharded` gcd(U, devices) devices of one process (so that the devices add no padding
    users) or every process's devices; both with train.user_chunk `chunk`, which pads each
    device's users to whole chunks."""
    if mode in LOOP_MODES:
        return None
    if mode == "vmap":  # one device: a one-device mesh splits nothing
        return Layout(n_users, single_device_mesh(), chunk=chunk)
    if mode == "vmap_sharded":
        # Several processes: every process's devices (run_benchmark skips a U they do not divide).
        n_dev = jax.device_count() if jax.process_count() > 1 else math.gcd(n_users, jax.device_count())
        return Layout(n_users, users_mesh(jax.devices()[:n_dev]), chunk=chunk)
    raise ValueError(f"mode={mode!r}: allowed {MODES}")


def build_mode(mode: str, w: Workload, consume: bool = False) -> tuple[Callable, dict, dict]:
    """(round_fn, placed inputs, info) for one mode; round_fn(base, states, data, masks, active).
    The vmapped modes run through the mode's Layout and vmap_round(..., user_chunk=): padding rows
    (users padded to whole chunks) train on copies of user 0's state and data but are inactive and
    dropped from every result. consume: the mode takes w.states0 itself instead of a copy (the
    last mode of a U: no second copy of every user's state)."""
    args = (w.model_cfg, w.tc, w.method, w.steps)
    states = w.states0 if consume else jax.tree.map(jnp.copy, w.states0)  # vmap donates its states
    if consume:
        w.states0 = None
    inputs = dict(base=w.base, states=states, data=w.data, masks=w.masks, active=w.active)
    info = {"devices": 1, "chunk": None, "padding_rows": 0}
    if mode == "loop_step":
        return loop_step_round(*args), inputs, info
    if mode == "loop_round":
        return loop_round(*args), inputs, info
    layout = mode_layout(mode, w.n_users, w.chunk)
    info.update(devices=layout.n_devices, chunk=layout.model_chunk, padding_rows=layout.n_padding)
    fn = vmap_round(*args, mesh=layout.mesh, user_chunk=layout.model_chunk)
    return fn, place(layout, pad_rows(inputs, layout.n_rows)), info


def pad_rows(inputs: dict, n_rows: int) -> dict:
    """The round's inputs with the user axis padded to n_rows: padding rows repeat row 0 (state,
    data, masks) and are inactive, so they change nothing and are never reported."""
    n = inputs["masks"].shape[0]
    if n_rows == n:
        return inputs
    pad = lambda x: jnp.concatenate([x, jnp.broadcast_to(x[:1], (n_rows - n, *x.shape[1:]))])
    out = {k: v if k == "base" else jax.tree.map(pad, v) for k, v in inputs.items()}
    out["active"] = jnp.concatenate([inputs["active"], jnp.zeros((n_rows - n,), bool)])
    return out


def place(layout: Layout, inputs: dict) -> dict:
    """The round's inputs on the layout's mesh: the base replicated, the rest split over `users`
    (the layout's shardings, as the training loop places them); the user axis must be the
    layout's rows (pad_rows)."""
    n = inputs["masks"].shape[0]
    if layout.n_rows != n:
        raise ValueError(f"{n} rows for a layout of {layout.n_rows} ({layout.n_users} users, {layout.n_padding} padding)")
    # Several processes: the same host values on every process (built from the seed); device_put
    # places each process's shards of the global arrays.
    host = jax.device_get if jax.process_count() > 1 else (lambda x: x)
    return {k: jax.device_put(host(v), layout.replicated if k == "base" else layout.users) for k, v in inputs.items()}
