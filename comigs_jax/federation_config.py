"""How the users of a Simulation federate (FederationConfig) and the keys that may differ between
the federations of one program, checked once (FederationError: the key, the value, what is allowed;
comigs_jax.configuration turns it into the config's one line)."""
from __future__ import annotations

import dataclasses

from comigs_jax import rules
from comigs_jax.federated import privacy, server_optimizer as so
from comigs_jax.federated.methods import Method
from comigs_jax.train.state import ROW_HPARAMS

# Config keys whose values may differ between the federations of one program: the seeds, the per-row
# values of the round program (train.state.ROW_HPARAMS) and of the server state (the server optimizer's
# lr). A federation's dict (FederationConfig.federations) names train keys by their last name.
FEDERATION_KEYS = ("seed", "seeds") + tuple(f"train.{k}" for k in ROW_HPARAMS) + ("server.lr",)
MODES, WEIGHTINGS = ("vmap", "loop"), ("uniform", "tokens")
SIT_OUT = ("skip", "train")  # federation.sit_out: what a user does in a round it does not participate in


def _federation_names() -> tuple[str, ...]:
    """The keys of one federation's dict: "seed", the train keys of FEDERATION_KEYS by their last
    name (the round program's per-row hyper-parameters), any other key by its config name."""
    return ("seed",) + tuple(k[len("train."):] if k.startswith("train.") else k
                             for k in FEDERATION_KEYS if k not in ("seed", "seeds"))


class FederationError(ValueError):
    """A federation setting outside its limits: `key` (its config key), `value`, what is allowed
    (the config's one-line refusal), and what else a caller without a config is told (`detail`)."""

    def __init__(self, key: str, value, allowed: str, detail: str = ""):
        super().__init__(f"{key}={value!r} is not allowed: {allowed}" + (f"; {detail}" if detail else ""))
        self.key, self.value, self.allowed = key, value, allowed


def check_federations(federations) -> list[dict]:
    """Validated copies of `federations` (each a dict: "seed" and optional per-federation
    hyper-parameters); ValueError (one line) for a key that cannot vary inside one program."""
    names, out = _federation_names(), []
    for i, fed in enumerate(federations):
        fed = dict(fed)
        for k in fed:
            if k not in names:
                raise ValueError(f"federation {i}: {k!r} cannot differ between federations of one program (it "
                                 f"changes shapes or the schedule); allowed: {', '.join(names)}; run each "
                                 f"value of {k!r} as its own program")
        if "seed" not in fed:
            raise ValueError(f"federation {i}: no 'seed'")
        fed["seed"] = int(fed["seed"])
        out.append(fed)
    if not out:
        raise ValueError("federations: at least one federation is needed")
    return out


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """How the users of a Simulation federate, checked here once (FederationError, one line).

    federations: F dicts {"seed": int, and optionally lr / router_lr / lb_weight / weight_decay /
    prune_lambda / prox_mu / "server.lr"} trained as one program (F = 1: a run alone). mode: "vmap" (one program for all
    users) or "loop" (the same round per user in a Python loop). weighting: "uniform" (the
    reference) or "tokens" (by training-set size). participation: the fraction of users that train
    in a round, in (0, 1]. dropout: the probability that a participant stops at a random local step
    and does not upload, in [0, 1). sit_out: what a user that does not participate in a round does,
    "skip" (no local steps: less compute and less collaboration) or "train" (all its local steps,
    then no upload: less collaboration only). ranks: each user's expert LoRA rank (None: the padded rank for
    all). expert_counts: experts per user (None: all). PCL mixes every user's model: participation
    1 and dropout 0 only. server_optimizer: the step after the aggregation
    (comigs_jax.federated.server_optimizer.ServerOptimizer; its lr: each federation's
    "server.lr", default 1); None: the aggregate is the new value (today's mean). sampling: "fixed"
    (round(participation x users) drawn without replacement each round) or "poisson" (each user with
    probability participation). dp: user-level DP of the shared leaves
    (comigs_jax.federated.privacy.DP, its sampling and q this config's); None: none."""
    federations: tuple = ({"seed": 0},)
    mode: str = "vmap"
    weighting: str = "uniform"
    participation: float = 1.0
    dropout: float = 0.0
    ranks: tuple | None = None
    expert_counts: tuple | None = None
    server_optimizer: so.ServerOptimizer | None = None
    sit_out: str = "skip"
    sampling: str = "fixed"
    dp: privacy.DP | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("federations", tuple(check_federations(self.federations)))
        for k in ("ranks", "expert_counts"):
            if getattr(self, k) is not None:
                set_(k, tuple(int(x) for x in getattr(self, k)))
        if self.mode not in MODES:
            raise FederationError("federation.mode", self.mode, " | ".join(MODES))
        if self.weighting not in WEIGHTINGS:
            raise FederationError("federation.weighting", self.weighting, " | ".join(WEIGHTINGS))
        if not 0 < self.participation <= 1:
            raise FederationError("federation.participation", self.participation, "in (0, 1]")
        if not 0 <= self.dropout < 1:
            raise FederationError("federation.dropout", self.dropout, "in [0, 1)")
        if self.sit_out not in SIT_OUT:
            raise FederationError("federation.sit_out", self.sit_out, " | ".join(SIT_OUT))
        if self.sampling not in privacy.SAMPLINGS:
            raise FederationError("federation.sampling", self.sampling, " | ".join(privacy.SAMPLINGS))
        if self.dp is not None:
            privacy.check_federation(self.dp, self.weighting, self.sampling, self.participation)
        for fed in self.federations:
            if "server.lr" in fed and not so.check_lr(fed["server.lr"]):
                raise FederationError("server.lr", fed["server.lr"], "a positive finite number")

    @property
    def seeds(self) -> list[int]:
        return [f["seed"] for f in self.federations]

    def check(self, method: Method, n_users: int, n_experts: int, n_generalists: int, rank: int) -> None:
        """FederationError for limits that need the method and the model: PCL's participation and
        drop-outs, expert counts in [max(1, n_generalists), n_experts], ranks in [1, rank], one of
        each per user."""
        if method.pcl is not None and self.dropout > 0:
            raise FederationError("federation.dropout", self.dropout, f"0 for method {method.name} (PCL mixes every "
                                  "user's model every mixing round; drop-outs are not supported)")
        if method.pcl is not None and self.participation < 1:
            raise FederationError("federation.participation", self.participation, f"1 for method {method.name} (PCL "
                                  "mixes every user's model every mixing round; partial participation is not "
                                  "supported)", "PCL: only participation=1 is supported")
        if self.dp is not None:
            privacy.check_method(self.dp, method, self.ranks)
        opt = self.server_optimizer
        why = rules.no_server_step(method)
        if opt is not None and why:
            raise FederationError("server.optimizer", opt.name, f"none for method {method.name} ({why})")
        for key, values, lo, hi in (("model.expert_counts", self.expert_counts, max(n_generalists, 1), n_experts),
                                    ("model.ranks", self.ranks, 1, rank)):
            if values is None:
                continue
            if len(values) != n_users:
                raise FederationError(key, list(values), f"{n_users} entries (data.n_users)",
                                      f"{len(values)} entries for {n_users} users")
            bad = [v for v in values if not lo <= v <= hi]
            if bad and key == "model.ranks":
                raise FederationError(key, list(values), f"every rank in [1, model.rank={hi}] (the padded rank)",
                                      f"rank {bad[0]} does not fit the padded rank {hi}")
            if bad:
                raise FederationError(key, list(values), f"every user needs at least max(1, n_generalists="
                                      f"{n_generalists}) and at most {hi} experts", f"expert count {bad[0]}")
