"""The rank-aware servers of the expert LoRA leaves (the math: comigs_jax.federated.ranks): the
mean per rank component, FlexLoRA and FlexLoRA as the reference (HetLoRA: servers/hetlora.py).
The attention LoRA and routers are averaged by the plain mean; the state holds each row's ranks
and FlexLoRA's scales (form c_i, back c'_i)."""
from __future__ import annotations

import numpy as np
from flax import traverse_util

from comigs_jax.federated.ranks import aggregate_ranked, is_ranked, lora_scale
from comigs_jax.federated.server import Rows, Server, Setup, Uploads, with_current
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


MASKED_MEAN = Server("masked_mean", _apply("mean"), ranked=True,
                     description="each rank component averaged over the users that have it")
FLEXLORA = Server("flexlora", _apply("flexlora"), init=_flexlora_scales(False), ranked=True,
                  description="FlexLoRA: SVD of the token-weighted mean of the users' products")
FLEXLORA_REFERENCE = Server("flexlora_reference", _apply("flexlora_reference"), init=_flexlora_scales(True),
                            ranked=True, description="FlexLoRA as the reference (D3, D3b)")
