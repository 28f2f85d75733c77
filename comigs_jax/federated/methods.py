"""Every method is a record: which roles are averaged, how the router learns, how many rounds.

No method has its own training loop; the engine reads these fields (method.md §2, §7).

router modes:
- ``bilevel``: router phases on the VALIDATION split, alternating with expert steps (CoMiGS).
- ``alternating_train``: the same schedule on the TRAINING split (Table 4 ablation).
- ``joint``: router and experts in one optimizer on the training loss (pFedMoE, "MoE").
- ``none``: no router; the uniform mean of the experts (Local, FedAvg, Centralized).
"""
from __future__ import annotations

import dataclasses

from comigs_jax.federated.roles import TRAINABLE_ROLES

ROUTER_MODES = ("bilevel", "alternating_train", "joint", "none")


@dataclasses.dataclass(frozen=True)
class Method:
    """A collaboration method as configuration.

    shared_roles: roles averaged across users after every round (and made identical at round 0).
    router_mode: one of ROUTER_MODES.
    one_round: shared leaves are synchronised at round 0 only, as the reference's R = 1 x S = 200
      runs (Local, CoMiGS-2S, Centralized). The engine still runs rounds x local_steps steps in
      rounds (for evaluation, logging and checkpoints) but skips aggregation: the same math,
      since step counters, schedules and optimizer states never reset between rounds.
    pooled_data: train one model on the union of the users' data (Centralized).
    """

    name: str
    shared_roles: tuple[str, ...]
    router_mode: str
    one_round: bool = False
    pooled_data: bool = False
    description: str = ""

    def __post_init__(self):
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"method {self.name}: router_mode={self.router_mode!r}: allowed {ROUTER_MODES}")
        bad = set(self.shared_roles) - set(TRAINABLE_ROLES)
        if bad:
            raise ValueError(f"method {self.name}: shared_roles {sorted(bad)}: allowed {TRAINABLE_ROLES}")

    @property
    def has_router(self) -> bool:
        return self.router_mode != "none"

    @property
    def alternating(self) -> bool:
        return self.router_mode in ("bilevel", "alternating_train")


_ALL_EXPERTS = ("attn", "generalist", "specialist")
_GENERALISTS = ("attn", "generalist")

METHODS = {m.name: m for m in [
    Method("local", _ALL_EXPERTS, "none", one_round=True,
           description="uniform mixture of experts, trained alone after one round-0 sync"),
    Method("fedavg", _ALL_EXPERTS, "none", description="uniform mixture of experts, all averaged every round"),
    Method("centralized", _ALL_EXPERTS, "none", one_round=True, pooled_data=True,
           description="one model on the pooled data of all users"),
    Method("pfedmoe", _GENERALISTS, "joint", description="generalist shared, router trained jointly on train data"),
    Method("comigs", _GENERALISTS, "bilevel", description="CoMiGS: generalists shared, specialists and router local"),
    Method("comigs_2g", _ALL_EXPERTS, "bilevel", description="CoMiGS with every expert shared, router local"),
    Method("comigs_2s", _GENERALISTS, "bilevel", one_round=True,
           description="CoMiGS with one round: the generalist is synced at round 0 only"),
    Method("comigs_train", _GENERALISTS, "alternating_train",
           description="ablation: CoMiGS with router phases on training data"),
    Method("fedavg_moe", _ALL_EXPERTS, "joint", description="ablation: all experts shared, router joint"),
    Method("local_moe", _ALL_EXPERTS, "joint", one_round=True, description="ablation: local, router joint"),
    Method("fedavg_moe_train", _ALL_EXPERTS, "alternating_train",
           description="ablation: all experts shared, router phases on training data"),
    Method("local_moe_train", _ALL_EXPERTS, "alternating_train", one_round=True,
           description="ablation: local, router phases on training data"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: allowed {sorted(METHODS)}")
    return METHODS[name]


def configure_model(model_cfg, method: Method):
    """The model config a method needs: no router parameters when the method has no router."""
    if model_cfg.moe is None:
        raise ValueError("the federated methods need a mixture-of-experts model (model_cfg.moe)")
    router = "learned" if method.has_router else "uniform"
    return dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, router=router))
