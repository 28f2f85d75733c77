"""Server optimizers (Reddi et al., Adaptive Federated Optimization, ICLR 2021, Algorithm 2; Hsu et
al. 2019 for FedAvgM): the shared leaves' pseudo-gradient g = x - mean (the server value minus the
weighted mean of the uploads; the paper's Delta is -g) fed to an optax transformation, x <- x + u.

    sgd      optax.sgd(lr, momentum): m = momentum m + g, x -= lr m. FedAvgM with momentum > 0;
             lr 1, momentum 0 is the mean (FedAvg) up to float rounding.
    adam     FedAdam:    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2
    yogi     FedYogi:    m as adam, v = v - (1 - b2) g^2 sign(v - g^2)
    adagrad  FedAdagrad: m as adam, v = v + g^2
             (all three) x -= lr m / (sqrt(v) + tau), m_{-1} = 0, v_{-1} = tau^2.

The adaptive rules are Algorithm 2 exactly, as an optax GradientTransformation (`scale_by_fedopt`)
from optax's own moment updates: optax.adam / yogi / adagrad are other rules (bias-corrected
moments, v_{-1} = 0 for adam and 1e-6 for yogi's m and v, adagrad's eps inside the square root
and no momentum), which docs/architecture.md lists. Every rule is elementwise, so the server
applies it to the rows' stacked leaves with each row's own lr (`server.lr`, per federation).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("none", "sgd", "adam", "yogi", "adagrad")
ADAPTIVE = ("adam", "yogi", "adagrad")


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    """The static side of a server optimizer (hashable: part of the server program's key). The
    learning rate is per federation (the "server.lr" of each federation's dict, default 1.0)."""
    name: str = "sgd"
    momentum: float = 0.0  # sgd only: FedAvgM's server momentum beta
    b1: float = 0.9        # adaptive rules: the first-moment decay
    b2: float = 0.99       # adam, yogi: the second-moment decay (adagrad sums)
    tau: float = 1e-3      # adaptive rules: the adaptivity tau (sqrt(v) + tau; v_{-1} = tau^2)

    def __post_init__(self):
        problem = check(self)
        if problem:
            raise ValueError(f"server.{problem[0]}={problem[1]!r} is not allowed: {problem[2]}")


def check(opt: ServerOptimizer) -> tuple | None:
    """(key, value, allowed) of the first setting outside its limits, or None."""
    if opt.name not in OPTIMIZERS[1:]:
        return "optimizer", opt.name, " | ".join(OPTIMIZERS)
    for key in ("momentum", "b1", "b2"):
        if not 0 <= getattr(opt, key) < 1:
            return key, getattr(opt, key), "in [0, 1)"
    if not (opt.tau > 0 and math.isfinite(opt.tau)):
        return "tau", opt.tau, "a positive finite number (v starts at tau^2)"
    return None


def check_lr(lr) -> bool:
    return isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)


class FedOptState(NamedTuple):
    mu: optax.Updates  # m, the first moment of the pseudo-gradient
    nu: optax.Updates  # v, its second moment (adam, yogi) or sum of squares (adagrad)


def scale_by_fedopt(rule: str, b1: float, b2: float, tau: float) -> optax.GradientTransformation:
    """Algorithm 2's direction m / (sqrt(v) + tau) (to be scaled by -lr), v_{-1} = tau^2."""
    if rule not in ADAPTIVE:
        raise ValueError(f"scale_by_fedopt: rule={rule!r}: allowed {ADAPTIVE}")

    def init(params):
        return FedOptState(optax.tree.zeros_like(params), optax.tree.full_like(params, tau * tau))

    def second_moment(g, v):
        g2 = jnp.square(g)
        if rule == "adam":
            return b2 * v + (1 - b2) * g2
        if rule == "yogi":
            return v - (1 - b2) * g2 * jnp.sign(v - g2)
        return v + g2

    def update(updates, state, params=None):
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = jax.tree.map(second_moment, updates, state.nu)
        return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu), FedOptState(mu, nu)

    return optax.GradientTransformation(init, update)


def transformation(opt: ServerOptimizer, lr) -> optax.GradientTransformation:
    """The optax transformation of `opt` at learning rate `lr` (a traced per-row scalar is fine:
    the states do not depend on it)."""
    if opt.name == "sgd":
        return optax.sgd(lr, momentum=opt.momentum or None)
    return optax.chain(scale_by_fedopt(opt.name, opt.b1, opt.b2, opt.tau), optax.scale_by_learning_rate(lr))


def init_rows(opt: ServerOptimizer, value: dict):
    """The optimizer state of every row: value's leaves [rows, ...] -> state leaves [rows, ...]."""
    return jax.vmap(transformation(opt, 1.0).init)(value)


def step_rows(opt: ServerOptimizer, value: dict, mean: dict, state, lr: jax.Array):
    """One server step per row: value, mean [rows, ...] (the server value and the aggregate),
    lr [rows] -> (new value, new state). Rows of one federation hold the same value, mean,
    state and lr, so each computes its federation's step."""
    def one(x, m, s, r):
        g = jax.tree.map(jnp.subtract, x, m)  # the pseudo-gradient: server value - mean
        u, s = transformation(opt, r).update(g, s, x)
        return optax.apply_updates(x, u), s
    return jax.vmap(one)(value, mean, state, lr)
