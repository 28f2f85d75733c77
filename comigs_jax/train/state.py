"""Per-user training state and the optimizers (method.md §3.3).

Everything in `UserState` carries a leading user axis [U, ...] when users are stacked; the
functions in comigs_jax.train.steps see one user at a time (no user axis) and are vmapped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from comigs_jax.federated.methods import Method
from comigs_jax.federated.roles import EXPERT_ROLES, TRAINABLE_ROLES, filter_leaves, filter_roles, merge, role_of, split_base
from comigs_jax.model.lm import ModelConfig, init_params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local training (defaults: the reference scripts, method.md §3)."""

    rounds: int = 20
    local_steps: int = 10
    batch_size: int = 64
    seq_len: int = 128
    lr: float = 2e-3             # expert lr: cosine from lr to lr * lr_final_ratio over the run
    lr_final_ratio: float = 0.1
    router_lr: float = 2e-3      # constant
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    router_every: int = 30       # a router phase after every router_every-th expert step ...
    router_steps: int = 10       # ... of router_steps router steps
    lb_weight: float = 0.01
    faithful: bool = False       # reproduce the reference's gradient leaks D1, D2 (method.md §8)
    prune_lambda: float = 0.0    # weight of the rank-tail pruning regulariser (HetLoRA/FlexLoRA, method.md §7); 0: off
    prox_mu: float = 0.0         # FedProx's mu: mu/2 ||w - w_round_start||^2 on the shared leaves; 0: off

    def __post_init__(self):
        for name in ("rounds", "local_steps", "batch_size", "seq_len", "router_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a positive integer")
        if self.router_steps < 0:
            raise ValueError(f"router_steps={self.router_steps}: must be >= 0")
        for name in ("lr", "router_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        for name in ("prune_lambda", "prox_mu"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps


@flax.struct.dataclass
class UserState:
    """params: trainable leaves (no base). opt_expert / opt_router: optax states (opt_router is
    () when the router has no optimizer of its own). step: expert steps so far (int32), counted
    over the whole run. key: PRNG key (uint32 [2]). leak: gradient buffers of faithful mode,
    {"expert": ..., "router": ...} or ()."""

    params: Any
    opt_expert: Any
    opt_router: Any
    step: jax.Array
    key: jax.Array
    leak: Any


def expert_roles(method: Method) -> tuple[str, ...]:
    """Roles that the expert optimizer updates: the router too in joint mode."""
    return TRAINABLE_ROLES if method.router_mode == "joint" else EXPERT_ROLES


def is_expert_leaf(method: Method):
    """path -> whether the expert optimizer trains that leaf: its role is one of expert_roles
    and it is not frozen (FFA-LoRA's A)."""
    roles = expert_roles(method)
    return lambda path: role_of(path) in roles and not method.is_frozen(path)


# The scalar hyper-parameters that may differ between federations run as one program (traced
# per-row values, comigs_jax.train.steps); they change neither shapes nor the optimizer states.
ROW_HPARAMS = ("lr", "router_lr", "lb_weight", "weight_decay", "prune_lambda", "prox_mu")


def hparam(tc: TrainConfig, hp: dict | None, name: str):
    """tc's value of `name`, or the per-row override hp[name] (a traced scalar) when given."""
    return (hp or {}).get(name, getattr(tc, name))


def expert_optimizer(tc: TrainConfig, hp: dict | None = None) -> optax.GradientTransformation:
    """adamw on a cosine schedule from lr; hp: per-row overrides of ROW_HPARAMS (None: tc's)."""
    lr = optax.cosine_decay_schedule(hparam(tc, hp, "lr"), tc.total_steps, alpha=tc.lr_final_ratio)
    return optax.adamw(lr, tc.b1, tc.b2, tc.eps, weight_decay=hparam(tc, hp, "weight_decay"))


def router_optimizer(tc: TrainConfig, hp: dict | None = None) -> optax.GradientTransformation:
    return optax.adamw(hparam(tc, hp, "router_lr"), tc.b1, tc.b2, tc.eps,
                       weight_decay=hparam(tc, hp, "weight_decay"))


def leaks_active(tc: TrainConfig, method: Method) -> bool:
    return tc.faithful and method.alternating


def init_trainable(model_cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh adapter leaves (A random, B = 0, routers N(0, 0.02)) for one user."""
    return split_base(init_params(model_cfg, key))[1]


def init_user_state(params: dict, key: jax.Array, tc: TrainConfig, method: Method) -> UserState:
    """The state of one user around its trainable params (no user axis)."""
    exp = filter_leaves(params, is_expert_leaf(method))
    opt_router = router_optimizer(tc).init(filter_roles(params, ("router",))) if method.alternating else ()
    leak = ()
    if leaks_active(tc, method):
        leak = {"expert": jax.tree.map(jnp.zeros_like, exp),
                "router": jax.tree.map(jnp.zeros_like, filter_roles(params, ("router",)))}
    return UserState(params=params, opt_expert=expert_optimizer(tc).init(exp), opt_router=opt_router,
                     step=jnp.zeros((), jnp.int32), key=key, leak=leak)


def init_states_unjitted(model_cfg: ModelConfig, tc: TrainConfig, method: Method, key: jax.Array, n_users: int,
                n_shared_specialists: int | None = None) -> UserState:
    """Stacked states of n_users users [U, ...], with round 0's synchronisation applied.

    Shared leaves (by the method's roles and factors) and frozen leaves come from one "server"
    initialisation and are identical across users; the other leaves (specialists, routers, a
    FedSA-LoRA B) are initialised per user.
    """
    from comigs_jax.federated.aggregate import aggregate

    k_server, k_users, k_state = jax.random.split(key, 3)
    user_keys = jax.random.split(k_users, n_users)
    server = init_trainable(model_cfg, k_server)
    users = jax.vmap(lambda k: init_trainable(model_cfg, k))(user_keys)
    # Round 0: every user starts from the server's shared leaves; a mean over copies of the
    # server is the server, so the aggregation rule also decides which specialist slots count.
    server_stack = jax.tree.map(lambda s, u: jnp.broadcast_to(s, u.shape), server, users)
    synced = aggregate(server_stack, jnp.ones(n_users), method.shared_roles, n_shared_specialists,
                       method.shared_factors, method.frozen)
    params = merge(filter_leaves(synced, method.is_shared),
                   filter_leaves(server_stack, method.is_frozen),
                   filter_leaves(users, lambda p: not (method.is_shared(p) or method.is_frozen(p))))
    state_keys = jax.random.split(k_state, n_users)
    return jax.vmap(lambda p, k: init_user_state(p, k, tc, method))(params, state_keys)


# Jitted: eager initialisation of a vmapped Flax model is slow (seconds for tiny models).
init_states = jax.jit(init_states_unjitted, static_argnums=(0, 1, 2, 4, 5))
