"""PCL's mixing (no server): after its mixing rounds every row becomes W @ every row's model,
W = softmax_j(-ppl_ij) within its federation (the rule: comigs_jax.federated.pcl; W is scored on
validation data by comigs_jax.experiment.pcl_mixing)."""
from __future__ import annotations

from comigs_jax.federated.pcl import mix_params, mixes_after
from comigs_jax.federated.server import Server


def apply(setup, params: dict, w, state: dict):
    return mix_params(params, w), state


def after_round(method, round_index: int) -> bool:
    return mixes_after(method.pcl, round_index)


def accounting(model_cfg, method, expert_counts, rounds: int, rounds_taken, **kw) -> dict:
    from comigs_jax.federated.communication import pcl_accounting
    return pcl_accounting(model_cfg, method, len(expert_counts), rounds)


SERVER = Server("pcl", apply, inputs="mixing", after_round=after_round, communication=accounting,
                description="PCL: every user's model mixed with softmax(-validation ppl) weights")
