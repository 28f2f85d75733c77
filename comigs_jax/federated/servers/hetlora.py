"""HetLoRA's servers (the rule: comigs_jax.federated.hetlora): `hetlora`, the paper's rule (one rank
per user), and `hetlora_reference`, the reference code's (a rank per user per LoRA module, the
faithful mode's). The attention LoRA and routers are averaged by the plain mean. The state holds,
besides the per-row ranks (`rank_state`: the user's rank, for the reference its largest module
rank), the server's pre-aggregation tails per module ("server_tail" [rows, M]) and, for the
reference, every module's rank ("module_ranks" [rows, M], which the round masks each module to);
checkpoints keep both with the users' states. `stepped`: the rule split around the server's
global for a server optimizer (servers/optimizer.py)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from comigs_jax.federated.hetlora import (hetlora_aggregate, hetlora_cut, hetlora_distribute, hetlora_global,
                                          truncate)
from comigs_jax.federated.ranks import is_ranked, module_layout, n_modules
from comigs_jax.federated.server import Rows, Server, Setup, Stepped, Uploads, with_current
from comigs_jax.federated.servers.mean import mean_of_shared
from comigs_jax.model.precision import wide


def _init(reference: bool):
    def init(setup: Setup, rows: Rows) -> dict:
        if rows.params is None:
            raise ValueError("the hetlora servers need the rows' parameter shapes (Rows.params)")
        flat = traverse_util.flatten_dict(rows.params)
        layout = module_layout(flat, rows=False)
        dtype = wide(jnp.dtype(flat[layout[0][0]].dtype)) if layout else jnp.float32
        m = n_modules(flat)
        state = {"server_tail": np.zeros((rows.n_rows, m), dtype)}  # round 0: the server's B is 0
        if reference:
            state["module_ranks"] = np.repeat(np.asarray(rows.full_ranks, np.int32)[:, None], m, axis=1)
        return state
    return init


def _module_ranks(state: dict, reference: bool):
    """[rows, M]: every module's rank (clean: each row's one rank on all its modules)."""
    tail = state["server_tail"]
    return state["module_ranks"] if reference else jnp.broadcast_to(state["ranks"]["current"][:, None], tail.shape)


def _with_ranks(state: dict, new, reference: bool) -> dict:
    rk = state["ranks"]
    current = new.max(axis=1) if new.shape[1] else rk["current"]  # the reference: its largest module
    state = {**state, "ranks": with_current(rk, current)}
    return {**state, "module_ranks": new} if reference else state


def _apply(reference: bool):
    def apply(setup: Setup, params: dict, up: Uploads, state: dict):
        m = setup.method
        plain = mean_of_shared(setup, params, up)
        ranked, new, tail = hetlora_aggregate(params, up.weights, up.groups, setup.n_groups,
                                              _module_ranks(state, reference), state["server_tail"],
                                              reference=reference, is_shared=m.is_shared,
                                              n_shared_specialists=setup.n_shared_specialists)
        a, b = traverse_util.flatten_dict(plain), traverse_util.flatten_dict(ranked)
        out = {p: b[p] if is_ranked(p) and m.is_shared(p) else x for p, x in a.items()}
        return traverse_util.unflatten_dict(out), {**_with_ranks(state, new, reference), "server_tail": tail}
    return apply


# ----------------------------------------------------------------------------- with a server optimizer
def _stepped(reference: bool) -> Stepped:
    def aggregate(setup: Setup, params: dict, up: Uploads, state: dict):
        m, flat = setup.method, traverse_util.flatten_dict(params)
        new = hetlora_cut(flat, up.weights, _module_ranks(state, reference), state["server_tail"],
                          reference=reference, is_shared=m.is_shared, n_shared_specialists=setup.n_shared_specialists)
        glob = truncate(hetlora_global(flat, up.weights, up.groups, setup.n_groups, new, reference=reference,
                                       is_shared=m.is_shared), new, m.is_shared)
        plain = traverse_util.flatten_dict(mean_of_shared(setup, params, up))
        return {p: glob[p] if p in glob else plain[p] for p in flat if m.is_shared(p)}, new

    def distribute(setup: Setup, params: dict, up: Uploads, state: dict, value: dict, new):
        m, flat = setup.method, traverse_util.flatten_dict(params)
        glob = truncate({p: x for p, x in value.items() if is_ranked(p)}, new, m.is_shared)
        out, tail = hetlora_distribute(flat, glob, new, state["server_tail"], jnp.ones(new.shape[0], bool),
                                       is_shared=m.is_shared, n_shared_specialists=setup.n_shared_specialists)
        state = {**_with_ranks(state, new, reference), "server_tail": tail}
        return traverse_util.unflatten_dict(out), state, {**value, **glob}

    # start: None, the rows' shared leaves (each row's truncation of its federation's global at round 0)
    return Stepped(aggregate, distribute)


HETLORA = Server("hetlora", _apply(False), init=_init(False), ranked=True, saved=("server_tail",),
                 stepped=_stepped(False),
                 description="HetLoRA (the paper): self-pruning of each user's rank against the global "
                             "modules it received, then the zero-padded mean weighted by |dW| shares")
HETLORA_REFERENCE = Server("hetlora_reference", _apply(True), init=_init(True), ranked=True,
                           saved=("module_ranks", "server_tail"), stepped=_stepped(True),
                           description="HetLoRA as the reference: per-module ranks, cut against the server's "
                                       "pre-aggregation state, then the mean weighted by each factor's norm share")
