"""The rank-aware servers of the expert LoRA leaves (the math: comigs_jax.federated.ranks): the
mean per rank component, FlexLoRA and FlexLoRA as the reference (HetLoRA: servers/hetlora.py).
The attention LoRA and routers are averaged by the plain mean; the state holds each row's ranks
and FlexLoRA's scales (form c_i, back c'_i). FlexLoRA's `stepped`: the rule split around the
server's dW per LoRA pair (product space) for a server optimizer (servers/optimizer.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from comigs_jax.federated.ranks import (_pair, aggregate_ranked, flexlora_mean, flexlora_split, is_ranked,
                                        keep_unshared, lora_scale)
from comigs_jax.federated.roles import factor_of
from comigs_jax.federated.server import Rows, Server, Setup, Stepped, Uploads, with_current
from comigs_jax.federated.servers.mean import mean_of_shared


def _apply(rule: str):
    def apply(setup: Setup, params: dict, up: Uploads, state: dict):
        m, rk = setup.method, state["ranks"]
        plain = mean_of_shared(setup, params, up)
        ranked, new = aggregate_ranked(params, up.weights, up.n_tokens, rk["current"], rk["scale"],
                                       state.get("form"), state.get("back"), rule=rule, is_shared=m.is_shared,
                                       n_shared_specialists=setup.n_shared_specialists, groups=up.groups,
                                       n_groups=setup.n_groups)
        a, b = traverse_util.flatten_dict(plain), traverse_util.flatten_dict(ranked)
        out = {p: b[p] if is_ranked(p) and m.is_shared(p) else x for p, x in a.items()}
        return traverse_util.unflatten_dict(out), {**state, "ranks": with_current(rk, new)}
    return apply


def _flexlora_scales(reference: bool):
    def init(setup: Setup, rows: Rows) -> dict:
        lora, full = setup.lora, np.asarray(rows.full_ranks)
        if reference:  # D3b: merge_rate alpha/r_i, _svd's alpha/r_max
            form, back = lora.alpha / full.astype(np.float64), np.full(len(full), lora.alpha / lora.rank)
        else:  # the model's own scale both ways
            form = back = np.array([lora_scale(lora, int(r)) for r in full])
        return {"form": form, "back": back}  # float64: float32 on a device without 64-bit JAX
    return init


# ----------------------------------------------------------------------------- with a server optimizer
def product_path(a_path: tuple) -> tuple:
    """Where the server value keeps the product of a LoRA pair: (..., "fc_A") -> (..., "fc_dW")."""
    return a_path[:-1] + (a_path[-1][:-2] + "_dW",)


def _pairs(setup: Setup, flat: dict) -> list[tuple]:
    return sorted(p for p in flat if is_ranked(p) and factor_of(p) == "A" and setup.method.is_shared(p))


def _first_of_group(x: jax.Array, groups: jax.Array, n_groups: int) -> jax.Array:
    """[U, ...] -> [G, ...]: each group's first row (its rows hold copies of one value)."""
    idx = jnp.arange(groups.shape[0])
    return jnp.take(x, jax.ops.segment_min(idx, groups, n_groups), axis=0)


def _flexlora_stepped(rule: str) -> Stepped:
    last_only = rule == "flexlora_reference"

    def start(setup: Setup, params: dict, state: dict) -> dict:
        """Round 0: the shared leaves, and per LoRA pair each row's product c_i A_i B_i (0 on every
        row: B = 0 at round 0; distribute keeps a federation's first row's)."""
        flat = traverse_util.flatten_dict(params)
        out = {p: x for p, x in flat.items() if setup.method.is_shared(p) and not is_ranked(p)}
        for p in _pairs(setup, flat):
            n = flat[p].shape[0]  # one group per row: the row's own product
            out[product_path(p)] = flexlora_mean(flat[p], flat[_pair(p)], jnp.ones(n), state["form"], jnp.arange(n), n)
        return out

    def aggregate(setup: Setup, params: dict, up: Uploads, state: dict):
        flat = traverse_util.flatten_dict(params)
        plain = traverse_util.flatten_dict(mean_of_shared(setup, params, up))
        out = {p: plain[p] for p in flat if setup.method.is_shared(p) and not is_ranked(p)}
        for p in _pairs(setup, flat):
            mean = flexlora_mean(flat[p], flat[_pair(p)], up.n_tokens, state["form"], up.groups, setup.n_groups,
                                 last_only)
            out[product_path(p)] = jnp.take(mean, up.groups, axis=0)
        return out, None

    def distribute(setup: Setup, params: dict, up: Uploads, state: dict, value: dict, ctx):
        flat, rk, value = traverse_util.flatten_dict(params), state["ranks"], dict(value)
        new = {}
        for p in _pairs(setup, flat):
            dw = _first_of_group(value[product_path(p)], up.groups, setup.n_groups)       # [G, ..., in, out]
            value[product_path(p)] = jnp.take(dw, up.groups, axis=0)
            new[p], new[_pair(p)] = flexlora_split(dw, rk["current"], state["back"], up.groups, flat[p].shape[-1],
                                                   (flat[p].dtype, flat[_pair(p)].dtype))
        every = jnp.ones_like(up.weights)  # every row its view, uploads or not
        out = keep_unshared(new, flat, every, up.groups, setup.n_groups, setup.n_shared_specialists)
        return traverse_util.unflatten_dict(out), state, value

    return Stepped(aggregate, distribute, start)


MASKED_MEAN = Server("masked_mean", _apply("mean"), ranked=True,
                     description="each rank component averaged over the users that have it")
FLEXLORA = Server("flexlora", _apply("flexlora"), init=_flexlora_scales(False), ranked=True,
                  stepped=_flexlora_stepped("flexlora"),
                  description="FlexLoRA: SVD of the token-weighted mean of the users' products")
FLEXLORA_REFERENCE = Server("flexlora_reference", _apply("flexlora_reference"), init=_flexlora_scales(True),
                            ranked=True, stepped=_flexlora_stepped("flexlora_reference"),
                            description="FlexLoRA as the reference (D3, D3b)")
