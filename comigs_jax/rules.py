"""The config checks of the federated-learning rules that methods can take on top of their
sharing (issue 30): a server optimizer after the aggregation, FedProx's proximal term. Each
refusal is one line naming the key, the value and what is allowed, before any compile."""
from __future__ import annotations

from comigs_jax.errors import ConfigError
from comigs_jax.federated import server_optimizer as so
from comigs_jax.federated.methods import Method


def fail(key, value, allowed):
    raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def shares_after_round(method: Method) -> bool:
    """Whether a server aggregates some of `method`'s leaves after its rounds (not one-round
    methods, not PCL's serverless mixing)."""
    return bool(method.shared_roles) and not method.one_round and method.pcl is None


def no_server_step(method: Method) -> str:
    """Why `method` cannot end its aggregation with a server optimizer ("" when it can)."""
    if method.pcl is not None:
        return "PCL mixes whole models, with no server"
    if not shares_after_round(method):
        return "it shares nothing after round 0"
    return ""  # the means, HetLoRA and FlexLoRA (servers/optimizer.py)


def server_optimizer_of(cfg) -> so.ServerOptimizer | None:
    """The config's server optimizer (the `server` group), None for server.optimizer=none or a
    config without the group; ConfigError (one line) for a value outside its limits."""
    s = cfg.get("server")
    if s is None:
        return None
    if s.optimizer not in so.OPTIMIZERS:
        fail("server.optimizer", s.optimizer, " | ".join(so.OPTIMIZERS))
    if not so.check_lr(s.lr):
        fail("server.lr", s.lr, "a positive finite number")
    values = {k: s[k] for k in ("momentum", "b1", "b2", "tau")}
    try:  # every setting checked, also those of another rule than the configured one
        opt = so.ServerOptimizer("sgd" if s.optimizer == "none" else s.optimizer, **values)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    return None if s.optimizer == "none" else opt


def with_server_lr(cfg, fed: dict) -> dict:
    """A federation's dict with the config's server.lr (a config without a `server` group: as it is)."""
    return {**fed, "server.lr": cfg.server.lr} if cfg.get("server") is not None else fed


def check_prox(mu, method: Method) -> None:
    """FedProx's mu for `method`: > 0 for a method defined by it (fedprox), 0 for one that shares
    nothing after round 0 (the term would pull toward the user's own round-start leaves)."""
    if method.proximal and mu == 0:
        fail("train.prox_mu", mu, f"> 0 for method {method.name} (FedAvg with the proximal term "
             "mu/2 ||w - w_round_start||^2 on the shared leaves; e.g. 0.01)")
    if mu > 0 and not shares_after_round(method):
        fail("train.prox_mu", mu, f"0 for method {method.name} (it shares nothing after round 0: no "
             "round-start server value to stay near)")
