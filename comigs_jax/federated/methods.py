"""Every method is a record: which roles are averaged, how the router learns, how many rounds.

No method has its own training loop; the engine reads these fields (method.md §2, §7).

router modes:
- ``bilevel``: router phases on the VALIDATION split, alternating with expert steps (CoMiGS).
- ``alternating_train``: the same schedule on the TRAINING split (Table 4 ablation).
- ``joint``: router and experts in one optimizer on the training loss (pFedMoE, "MoE").
- ``none``: no router; the uniform mean of the experts (Local, FedAvg, Centralized, PCL).
"""
from __future__ import annotations

import dataclasses

from comigs_jax.federated.roles import TRAINABLE_ROLES, factor_of, role_of

ROUTER_MODES = ("bilevel", "alternating_train", "joint", "none")
ROUTERS = ("learned", "user")  # the router kinds of methods with a router (comigs_jax.model.config.ROUTER_KINDS)


@dataclasses.dataclass(frozen=True)
class PCL:
    """PCL's serverless mixing (comigs_jax.federated.pcl): after every 0-indexed round r with
    r >= start and r % every == 0, W_ij = softmax_j(-ppl of user j's model on `batches` random
    batches of user i's valid split) and every trainable leaf theta_i <- sum_j W_ij theta_j.
    The defaults are 77efb25's (rounds 4, 6, ..., 18 of 20); 2d42464 mixes every round."""

    start: int = 4
    every: int = 2
    batches: int = 20


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
    shared_factors: the LoRA factors ("A", "B") of the shared roles that are averaged; the other
      factor stays local (FedSA-LoRA shares A only). Routers have no factor.
    frozen: "role.factor" leaves that never train and keep the shared round-0 initialisation
      (FFA-LoRA: every A), e.g. ("attn.A", "generalist.A").
    pcl: PCL's perplexity-weighted mixing of whole models instead of server aggregation (with
      shared_roles=(): no round-0 sync, every user starts from its own initialisation); None: none.
    faithful: the record that reproduces the reference code's behaviour in faithful mode
      (train.faithful; method.md §8, D3b/D4/D5), when it differs; None otherwise.
    server: the name of the method's server in comigs_jax.federated.servers.SERVERS ("" derives
      it: "pcl" for PCL, "none" for one-round methods, else "mean", which becomes the rank-masked
      mean when users have ranks). HetLoRA and FlexLoRA aggregate the expert LoRA leaves by their
      rules (attention LoRA and routers: always the mean).
    router: the model's router kind when the method has one (router_mode != "none"), one of
      ROUTERS: "learned" (token-level, a linear map of each token's hidden state) or "user" (one
      learned logit vector per block: every token of the user mixes its experts alike).
    proximal: the method is defined by FedProx's proximal term (train.prox_mu / 2 ||w -
      w_round_start||^2 on the shared leaves in every expert step, comigs_jax.train.steps), so
      it needs train.prox_mu > 0; the term itself applies to any method that shares leaves.
    """

    name: str
    shared_roles: tuple[str, ...]
    router_mode: str
    one_round: bool = False
    pooled_data: bool = False
    description: str = ""
    shared_factors: tuple[str, ...] = ("A", "B")
    frozen: tuple[str, ...] = ()
    faithful: "Method | None" = None
    pcl: PCL | None = None
    server: str = ""
    router: str = "learned"
    proximal: bool = False

    def __post_init__(self):
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"method {self.name}: router_mode={self.router_mode!r}: allowed {ROUTER_MODES}")
        bad = set(self.shared_roles) - set(TRAINABLE_ROLES)
        if bad:
            raise ValueError(f"method {self.name}: shared_roles {sorted(bad)}: allowed {TRAINABLE_ROLES}")
        if not set(self.shared_factors) <= {"A", "B"}:
            raise ValueError(f"method {self.name}: shared_factors {self.shared_factors}: allowed 'A', 'B'")
        allowed = {f"{r}.{f}" for r in ("attn", "generalist", "specialist") for f in "AB"}
        if not set(self.frozen) <= allowed:
            raise ValueError(f"method {self.name}: frozen {sorted(set(self.frozen) - allowed)}: allowed {sorted(allowed)}")
        if self.router not in ROUTERS:
            raise ValueError(f"method {self.name}: router={self.router!r}: allowed {ROUTERS}")
        from comigs_jax.federated.servers import SERVERS  # the servers' modules import no method
        if not self.server:
            object.__setattr__(self, "server", "pcl" if self.pcl is not None else "none" if self.one_round else "mean")
        if self.server not in SERVERS:
            raise ValueError(f"method {self.name}: server={self.server!r}: allowed {', '.join(SERVERS)}")
        if (self.server == "none") != self.one_round or (self.server == "pcl") != (self.pcl is not None):
            raise ValueError(f"method {self.name}: server={self.server!r}: one-round methods have server 'none', "
                             "PCL methods 'pcl', and only they")
        if self.server.startswith("flexlora") and (self.frozen or set(self.shared_factors) != {"A", "B"}):
            raise ValueError(f"method {self.name}: FlexLoRA needs both factors shared and none frozen")
        if self.pcl is not None and (self.shared_roles or self.one_round or self.pooled_data):
            raise ValueError(f"method {self.name}: PCL mixing has no server (shared_roles=(), not one_round or pooled)")

    def is_shared(self, path: tuple) -> bool:
        """Whether the leaf at `path` is averaged across users every round (and identical at round
        0); frozen leaves are not (they never change)."""
        factor = factor_of(path)
        return (role_of(path) in self.shared_roles and (factor is None or factor in self.shared_factors)
                and not self.is_frozen(path))

    def is_frozen(self, path: tuple) -> bool:
        """Whether the leaf at `path` never trains (it keeps the shared round-0 value)."""
        return f"{role_of(path)}.{factor_of(path)}" in self.frozen

    def for_mode(self, faithful: bool) -> "Method":
        """The record a run uses: `faithful` (the reference's behaviour) when asked and defined."""
        return self.faithful if faithful and self.faithful is not None else self

    @property
    def has_router(self) -> bool:
        return self.router_mode != "none"

    @property
    def alternating(self) -> bool:
        return self.router_mode in ("bilevel", "alternating_train")


_ALL_EXPERTS = ("attn", "generalist", "specialist")
_GENERALISTS = ("attn", "generalist")
_ALL_A = ("attn.A", "generalist.A", "specialist.A")

METHODS = {m.name: m for m in [
    Method("local", _ALL_EXPERTS, "none", one_round=True,
           description="uniform mixture of experts, trained alone after one round-0 sync"),
    Method("fedavg", _ALL_EXPERTS, "none", description="uniform mixture of experts, all averaged every round"),
    Method("fedprox", _ALL_EXPERTS, "none", proximal=True,
           description="FedProx: FedAvg with train.prox_mu/2 ||w - w_round_start||^2 on the shared leaves in every "
                       "local expert step (needs train.prox_mu > 0)"),
    Method("centralized", _ALL_EXPERTS, "none", one_round=True, pooled_data=True,
           description="one model on the pooled data of all users"),
    Method("pfedmoe", _GENERALISTS, "joint", description="generalist shared, router trained jointly on train data"),
    Method("comigs", _GENERALISTS, "bilevel", description="CoMiGS: generalists shared, specialists and router local"),
    Method("comigs_2g", _ALL_EXPERTS, "bilevel", description="CoMiGS with every expert shared, router local"),
    Method("comigs_2s", _GENERALISTS, "bilevel", one_round=True,
           description="CoMiGS with one round: the generalist is synced at round 0 only"),
    Method("comigs_uniform", _GENERALISTS, "none",
           description="ablation: CoMiGS's sharing (generalists averaged, specialists local) with uniform mixing, no router"),
    Method("comigs_user_router", _GENERALISTS, "bilevel", router="user",
           description="ablation: CoMiGS with one learned expert weighting per user and layer (no token input), "
                       "trained on the validation loss"),
    Method("comigs_train", _GENERALISTS, "alternating_train",
           description="ablation: CoMiGS with router phases on training data"),
    Method("fedavg_moe", _ALL_EXPERTS, "joint", description="ablation: all experts shared, router joint"),
    Method("local_moe", _ALL_EXPERTS, "joint", one_round=True, description="ablation: local, router joint"),
    Method("fedavg_moe_train", _ALL_EXPERTS, "alternating_train",
           description="ablation: all experts shared, router phases on training data"),
    Method("local_moe_train", _ALL_EXPERTS, "alternating_train", one_round=True,
           description="ablation: local, router phases on training data"),
    # FFA-LoRA: every A frozen at the shared random init, only B trained and averaged. Faithful
    # (D4, the reference at 2d42464): the experts' A frozen, attention A trained and averaged.
    Method("ffa_lora", _ALL_EXPERTS, "none", shared_factors=("B",), frozen=_ALL_A, description="FFA-LoRA: A frozen at the shared init, B trained and averaged",
           faithful=Method("ffa_lora", _ALL_EXPERTS, "none", frozen=("generalist.A", "specialist.A"),
                           description="FFA-LoRA as the reference (D4): attention A trained and averaged")),
    # FFA-LoRA as 77efb25's table4/baseline_ffalora_1616.sh: clean as ffa_lora; faithful: `-as ffalora` is
    # Expert0CollaborationStrategy there, with one expert plain FedAvg of A and B (D4)
    Method("ffa_lora_77efb25", _ALL_EXPERTS, "none", shared_factors=("B",), frozen=_ALL_A,
           description="FFA-LoRA (clean: as ffa_lora); faithful: 77efb25's -as ffalora, FedAvg of A and B",
           faithful=Method("ffa_lora_77efb25", _ALL_EXPERTS, "none",
                           description="FFA-LoRA as 77efb25 (D4): the expert_0 strategy, one expert: A and B averaged")),
    # FedSA-LoRA: A averaged, B kept local. Faithful (D5): every factor averaged, i.e. FedAvg.
    Method("fedsa_lora", _ALL_EXPERTS, "none", shared_factors=("A",),
           description="FedSA-LoRA: A trained and averaged, B trained and kept local",
           faithful=Method("fedsa_lora", _ALL_EXPERTS, "none",
                           description="FedSA-LoRA as the reference (D5): A and B averaged (FedAvg)")),
    # HetLoRA / FlexLoRA (Table 2): one expert per user at its own rank (model.ranks), method.md §7.
    Method("hetlora", _ALL_EXPERTS, "none", server="hetlora",
           description="HetLoRA (the paper): each user cuts its rank to floor(0.99 r) when its tail is below "
                       "the global modules' it received; zero-padded mean weighted by |dW| shares; attention "
                       "LoRA averaged",
           faithful=Method("hetlora", _ALL_EXPERTS, "none", server="hetlora_reference",
                           description="HetLoRA as the reference: a rank per LoRA module, each cut against the "
                                       "server's pre-aggregation state before the mean weighted by each "
                                       "factor's norm share")),
    Method("flexlora", _ALL_EXPERTS, "none", server="flexlora",
           description="FlexLoRA: SVD of the token-weighted mean of the users' A B s(r_i); each user takes its "
                       "leading r_i components; attention LoRA averaged",
           faithful=Method("flexlora", _ALL_EXPERTS, "none", server="flexlora_reference",
                           description="FlexLoRA as the reference: only the last uploading user's (n_i / sum n) "
                                       "A B reaches the SVD (D3); products formed with alpha/r_i and split with "
                                       "alpha/r_max (D3b)")),
    # PCL (collab_run_client_level.py): no server, no round-0 sync; softmax(-ppl) mixing of whole models
    Method("pcl", (), "none", pcl=PCL(), description="PCL: no server; after rounds 4, 6, ..., 18 every user "
           "becomes a softmax(-valid ppl)-weighted mix of all users' models (77efb25)"),
    Method("pcl_every_round", (), "none", pcl=PCL(start=0, every=1),
           description="PCL mixing after every round (2d42464)"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: allowed {sorted(METHODS)}")
    return METHODS[name]


def configure_model(model_cfg, method: Method):
    """The model config a method needs: no router parameters when the method has no router, else
    the method's router kind."""
    if model_cfg.moe is None:
        raise ValueError("the federated methods need a mixture-of-experts model (model_cfg.moe)")
    router = method.router if method.has_router else "uniform"
    if router == "learned" and model_cfg.moe.router == "noisy_topk":  # model.router_kind: the Llama reference's gate
        router = "noisy_topk"
    return dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, router=router))
