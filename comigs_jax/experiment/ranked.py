"""The host side of per-user LoRA ranks in a Simulation: each row's rank scale as data, the rank
masks applied at initialisation, the rank-aware server (masked mean, HetLoRA, FlexLoRA), the
current (HetLoRA-pruned) ranks in the host state. The math is comigs_jax.federated.ranks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from comigs_jax import distributed
from comigs_jax.federated.aggregate import aggregate, aggregation_weights
from comigs_jax.federated.ranks import aggregate_ranked, apply_rank_scale, is_ranked, lora_scale, mask_ranks, rank_scales


def check_ranks(ranks, n_users: int, r_max: int) -> list[int]:
    """Validated per-user ranks; ValueError (one line) for a wrong length or a rank outside [1, r_max]."""
    ranks = [int(r) for r in ranks]
    if len(ranks) != n_users:
        raise ValueError(f"ranks has {len(ranks)} entries for {n_users} users")
    bad = [r for r in ranks if not 1 <= r <= r_max]
    if bad:
        raise ValueError(f"rank {bad[0]} does not fit the padded rank {r_max} (model rank): every rank must be in "
                         f"[1, {r_max}]")
    return ranks


class Ranks:
    """Per-row ranks of a Simulation: `full` (configured) and `current` ([n_padded] int arrays)."""

    def __init__(self, sim, ranks):
        moe = sim.model_cfg.moe
        self.lora, self.r_max = moe.lora, moe.lora.rank
        ranks = check_ranks(ranks if ranks is not None else [self.r_max] * sim.n_users, sim.n_users, self.r_max)
        if sim.method.pooled_data and min(ranks) < self.r_max:
            raise ValueError(f"method {sim.method.name} pools every user into one model: one rank, not {ranks}")
        n_rows = len(sim.masks)
        rows = ranks * sim.n_federations if not sim.method.pooled_data else [self.r_max]
        self.full = np.array(rows + [self.r_max] * (n_rows - len(rows)), np.int32)
        self.current = self.full.copy()
        self.rule = sim.method.server
        if sim.method.server == "flexlora_reference":  # D3b: merge_rate alpha/r_i, _svd's alpha/r_max
            form = self.lora.alpha / self.full.astype(np.float64)
            back = np.full(n_rows, self.lora.alpha / self.r_max)
        else:  # the model's own scale both ways
            form = back = np.array([lora_scale(self.lora, int(r)) for r in self.full])
        place = lambda a: sim.layout.place(np.asarray(a)[sim.local_rows])
        self.form, self.back = place(form), place(back)  # float64: float32 on a device without 64-bit JAX
        sim.data["rank_full"] = place(self.full)
        self._place_scale(sim)
        groups = sim.layout.federation_of_rows() if sim.n_federations > 1 else np.zeros(n_rows, np.int32)
        self.groups = place(groups.astype(np.int32))
        mask = jax.jit(mask_ranks, out_shardings=sim.layout.users)
        sim.states = sim.states.replace(params=mask(sim.states.params, sim.data["rank_scale"]))

    def _place_scale(self, sim):
        scale = rank_scales(self.current, self.full, self.lora, self.r_max)
        sim.data["rank_scale"] = sim.layout.place(scale[sim.local_rows])
        self.current_dev = sim.layout.place(self.current[sim.local_rows])

    def aggregate(self, sim) -> None:
        """The round's server: the attention LoRA and routers by the plain mean, the expert LoRA
        by the method's rule; HetLoRA's cuts update the current ranks."""
        real, active = jax.device_put((jnp.asarray(sim.real), jnp.asarray(sim.active)), sim.layout.users)
        n_tok = aggregation_weights(real, active, sim.data["train_len"])
        w = n_tok if sim.weighting == "tokens" else aggregation_weights(real, active)
        program = _server(sim.method, self.rule, sim.n_shared_specialists, sim.n_federations, sim.layout.users)
        params, new = program(sim.states.params, w, n_tok, self.current_dev, sim.data["rank_scale"], self.form,
                              self.back, self.groups)
        sim.states = sim.states.replace(params=params)
        new = np.asarray(distributed.to_host(new), np.int32)
        if not np.array_equal(new, self.current):
            self.current = new
            self._place_scale(sim)

    def model_view(self, sim, params):
        """Params as the model sees them (A times each row's rank scale, B masked): what the
        evaluation and exports use at the padded rank and its scale."""
        return jax.jit(apply_rank_scale, out_shardings=sim.layout.users)(params, sim.data["rank_scale"])

    def host_state(self) -> dict:
        return {"ranks": self.current.tolist()}

    def restore(self, sim, host: dict) -> None:
        if "ranks" in host:
            self.current = np.asarray(host["ranks"], np.int32)
            self._place_scale(sim)


@functools.lru_cache(maxsize=32)
def _server(method, rule: str, n_shared_specialists: int, n_feds: int, users):
    """jit: (params, w, n_tokens, ranks, scale, form, back, groups) -> (params, new ranks)."""

    def run(params, w, n_tok, ranks, scale, form, back, groups):
        plain = aggregate(params, w, method.shared_roles, n_shared_specialists, method.shared_factors, method.frozen,
                          groups=groups if n_feds > 1 else None, n_groups=n_feds)
        ranked, new_ranks = aggregate_ranked(params, w, n_tok, ranks, scale, form, back, rule=rule,
                                             is_shared=method.is_shared, n_shared_specialists=n_shared_specialists,
                                             groups=groups, n_groups=n_feds)
        a, b = traverse_util.flatten_dict(plain), traverse_util.flatten_dict(ranked)
        out = {p: b[p] if is_ranked(p) and method.is_shared(p) else x for p, x in a.items()}
        return traverse_util.unflatten_dict(out), new_ranks

    return jax.jit(run, out_shardings=(users, users))
