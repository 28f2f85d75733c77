"""A server optimizer stage on top of a server: uploads -> the inner rule's aggregate -> pseudo-
gradient (server value - aggregate) -> optax step (comigs_jax.federated.server_optimizer) -> the
new server value -> every row's view of it.

The means (mean, masked_mean, dp_mean): the rows' aggregate is the server value (the rank-masked
mean's per row on its own rank components) and every row gets the new value. The rules split
around their server value (`Server.stepped`, comigs_jax.federated.server.Stepped):

- hetlora, hetlora_reference: the value is the federation's global LoRA at the padded rank (the
  zero-padded, norm-share weighted mean of the cut uploads is the aggregate); every row receives
  the stepped global truncated to its rank (after this round's cuts), and the server's tails that
  the next round's cuts compare with are the stepped global's at those ranks. Each row keeps the
  global truncated to its rank (all the row ever reads: ranks only fall), so the value needs no
  cross-row reduction; at round 0 that is the row's own leaves (the synchronised init, B = 0).
- flexlora, flexlora_reference: the value lives in product space, per shared LoRA pair dW [rows,
  ..., d_in, d_out] under the path (..., "<matmul>_dW") (the aggregate: the token-weighted mean
  of the products c_i A_i B_i, or the reference's last-user term, D3); every row receives the
  rank-r_i SVD truncation of its federation's stepped dW with the scales of today (c'_i). dW
  starts at the round-0 product (0: B = 0). Memory: the value and each optax moment hold d_in x
  d_out per module per row, against (d_in + d_out) r of the factors (comigs_jax.capacity.server_state).

The attention LoRA and other shared leaves that a rule averages plainly are stepped as the mean's.
The state adds, per row (each federation's rows hold copies of one server): "server_value" (from
the round-0 parameters: `start`), "server_opt" (the optax state) and "server_lr" (the
federation's server.lr). The first two are checkpointed with the users' states; the lr comes from
the federation's settings. Elements the method does not share (local leaves, the specialist slots
past the shared ones) are the inner rule's. A federation none of whose users uploaded takes no
step (value and state kept) and its rows get their view of the server value (the rule alone
leaves them their own leaves: there sgd at lr 1 differs from it), except under DP, whose noised
mean is released (and stepped with) every round. PCL and the one-round methods aggregate nothing
after a round and are refused. Another stage that changes what is aggregated (e.g. a clipped,
noised sum) goes before this one: the step reads only the aggregate.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from comigs_jax.federated import server_optimizer as so
from comigs_jax.federated.roles import role_of, slot_axis
from comigs_jax.federated.server import Rows, Server, Setup, Uploads

OWN = ("server_value", "server_opt", "server_lr")
LR_KEY = "server.lr"  # the federation's key (configuration.FEDERATION_KEYS)


def _shared(setup: Setup, params: dict) -> dict:
    """{path: leaf} of the leaves the method shares (flat)."""
    return {p: x for p, x in traverse_util.flatten_dict(params).items() if setup.method.is_shared(p)}


def _slots(setup: Setup, path: tuple, x: jax.Array):
    """Which elements of the shared leaf x [rows, ...] are shared: True, or a specialist leaf's
    mask of its first n_shared_specialists slots (heterogeneous expert counts; aggregate's rule)."""
    axis = 1 + slot_axis(path)
    n = setup.n_shared_specialists
    if role_of(path) != "specialist" or n is None or n >= x.shape[axis]:
        return True
    shape = [1] * x.ndim
    shape[axis] = -1
    return (jnp.arange(x.shape[axis]) < n).reshape(shape)


def _step(setup: Setup, opt: so.ServerOptimizer, up: Uploads, state: dict, agg: dict) -> tuple[dict, dict]:
    """The optax step of every row's server value toward the aggregate agg (flat {path: [rows, ...]},
    keyed as the value): (new value (flat), new optax state). Unshared slots take no step; nor do
    the rows of a federation without uploads (except under DP, whose noised mean is released)."""
    x = traverse_util.flatten_dict(state["server_value"])
    mean = {p: jnp.where(_slots(setup, p, x[p]), agg[p], x[p]) for p in x}  # unshared slots: no step
    new, opt_state = so.step_rows(opt, traverse_util.unflatten_dict(x), traverse_util.unflatten_dict(mean),
                                  state["server_opt"], state["server_lr"])
    uploaded = jax.ops.segment_sum(up.weights, up.groups, setup.n_groups) > 0
    if setup.dp is not None:  # DP releases its noised mean every round, uploads or not (privacy.py)
        uploaded = jnp.ones_like(uploaded)
    has = jnp.take(uploaded, up.groups)  # [rows]: the row's federation had uploads
    keep = lambda a, b: jnp.where(has.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    new = jax.tree.map(keep, new, state["server_value"])
    return traverse_util.flatten_dict(new), jax.tree.map(keep, opt_state, state["server_opt"])


def _put_value(setup: Setup, flat: dict, value: dict) -> dict:
    """flat params with the value's leaves that are parameters written in their shared elements."""
    out = dict(flat)
    for p, v in value.items():
        if p in out:
            out[p] = jnp.where(_slots(setup, p, v), v, out[p])
    return traverse_util.unflatten_dict(out)


def _with_optimizer(inner: Server, opt: so.ServerOptimizer) -> Server:
    rule = inner.stepped

    def init(setup: Setup, rows: Rows) -> dict:
        lr = [float(f.get(LR_KEY, 1.0)) for f in rows.federations] or [1.0]
        groups = np.asarray(rows.groups)
        # float64: float32 on a device without 64-bit JAX (the float64 models' full precision with it)
        return {**inner.init(setup, rows), "server_lr": np.asarray(lr, np.float64)[np.minimum(groups, len(lr) - 1)]}

    def start(setup: Setup, params: dict, state: dict) -> dict:
        flat = rule.start(setup, params, state) if rule is not None and rule.start else _shared(setup, params)
        value = traverse_util.unflatten_dict(flat)
        return {**state, "server_value": value, "server_opt": so.init_rows(opt, value)}

    def apply(setup: Setup, params: dict, up: Uploads, state: dict):
        own = {k: v for k, v in state.items() if k not in OWN}
        if rule is None:  # the means: the rows' aggregate is the value
            agg, rest = inner.apply(setup, params, up, own)
            new, opt_state = _step(setup, opt, up, state, traverse_util.flatten_dict(agg))
            out = _put_value(setup, traverse_util.flatten_dict(agg), new)
        else:  # HetLoRA, FlexLoRA: every row its view of the stepped value
            agg, ctx = rule.aggregate(setup, params, up, own)
            new, opt_state = _step(setup, opt, up, state, agg)
            out, rest, new = rule.distribute(setup, params, up, own, new, ctx)
            out = _put_value(setup, traverse_util.flatten_dict(out), new)
        value = traverse_util.unflatten_dict(new)
        return out, {**state, **rest, "server_value": value, "server_opt": opt_state}

    return dataclasses.replace(inner, name=f"{inner.name}+{opt.name}", apply=apply, init=init, start=start,
                               saved=inner.saved + OWN[:2], stepped=None,
                               description=f"{inner.description}, then a server {opt.name} step on the shared leaves")


@functools.lru_cache(maxsize=64)
def with_optimizer(inner: Server, opt: so.ServerOptimizer) -> Server:
    """`inner` (an averaging server, or a rule split around its server value: `Server.stepped`)
    followed by the server optimizer `opt`: one record per pair, so that Simulations of one
    config share its compiled program."""
    if inner.inputs != "uploads" or inner.name in UNSUPPORTED:
        raise ValueError(f"server.optimizer={opt.name!r}: not on server {inner.name!r} ({UNSUPPORTED_WHY})")
    return _with_optimizer(inner, opt)


# PCL and the one-round methods aggregate nothing after a round: no server value to step.
UNSUPPORTED = ("pcl", "none")
UNSUPPORTED_WHY = "a server optimizer steps the server value of a rule that aggregates after every round"
