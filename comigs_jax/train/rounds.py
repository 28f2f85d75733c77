"""One local round as one XLA program: vmap over users of a lax.scan over local steps.

`user_round` is the round of ONE user. `vmap_round` stacks it over the user axis (sharded
over a mesh's `users` axis); `loop_round` jits it without the user axis and calls it in
a Python loop over users: the same math, the benchmark's baseline and the correctness oracle.
`loop_step_round` goes one step further back to the reference's structure: one jitted training
step (or router phase) per Python call, users in a Python loop.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from comigs_jax.federated.methods import Method
from comigs_jax.federated.sharding import USERS, replicated, user_sharded
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.chunks import CHUNK, chunked
from comigs_jax.train.state import TrainConfig, UserState
from comigs_jax.train.steps import expert_step, router_step, with_prox_anchor

def _tree_where(cond, new, old):
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def router_phase(state: UserState, base, data, mask, *, model_cfg, tc, method):
    """tc.router_steps router steps; returns (state, mean router-step cross-entropy)."""
    step = functools.partial(router_step, base=base, data=data, mask=mask, model_cfg=model_cfg, tc=tc, method=method)
    state, metrics = lax.scan(lambda s, _: step(s), state, None, length=tc.router_steps)
    return state, metrics["ce"].mean()


def user_round(base: dict, state: UserState, data: dict, mask: jax.Array, active: jax.Array, *,
               model_cfg: ModelConfig, tc: TrainConfig, method: Method, steps: int,
               axis_name: Optional[str] = None) -> tuple[UserState, dict]:
    """`steps` expert steps of one user, with router phases where the global step counter is a
    multiple of tc.router_every (alternating methods). An inactive user's state is unchanged.

    active: a bool (the user trains the whole round, or not at all) or an integer, the number of
    local steps the user makes (a user that drops out of the round, federation.dropout): steps at
    or after it leave the state unchanged, router phase included (0 = inactive, `steps` = all).
    The bool program is the one without drop-outs; the integer one selects after every step.
    With axis_name (inside vmap), the phase runs when any user is due, so that lax.cond keeps
    an unbatched predicate; users not due keep their state. Metrics: per step [steps, ...].
    """
    data = with_prox_anchor(data, state.params, tc, method)  # FedProx's w_round_start, when its term is on
    kw = dict(base=base, data=data, mask=mask, model_cfg=model_cfg, tc=tc, method=method)
    run_router = method.alternating and tc.router_steps > 0

    per_step = jnp.issubdtype(jnp.asarray(active).dtype, jnp.integer)

    def body(state, i):
        before = state
        state, m = expert_step(state, **kw)
        m = {k: v for k, v in m.items() if v is not None}
        if run_router:
            due = state.step % tc.router_every == 0
            any_due = due if axis_name is None else lax.psum(due.astype(jnp.int32), axis_name) > 0

            def phase(s):
                new, ce = router_phase(s, **kw)
                return _tree_where(due, new, s), jnp.where(due, ce, 0.0)

            state, router_ce = lax.cond(any_due, phase, lambda s: (s, jnp.zeros((), m["ce"].dtype)), state)
            m["router_ce"], m["router_phase"] = router_ce, due
        if per_step:  # a user that dropped out at step `active` keeps the state it had then
            state = _tree_where(i < active, state, before)
        return state, m

    new_state, metrics = lax.scan(body, state, jnp.arange(steps))
    return (new_state, metrics) if per_step else (_tree_where(active, new_state, state), metrics)


def vmap_round(model_cfg: ModelConfig, tc: TrainConfig, method: Method, steps: int, *, mesh: Mesh,
               user_chunk: int = 0):
    """jit(vmap(user_round)): (base, states [U], data [U], masks [U, E], active [U]) -> (states, metrics).

    Users are sharded over the mesh's `users` axis (one device: nothing is split) and the base is
    replicated; U must be a multiple of the mesh size (comigs_jax.federated.layout pads it).
    user_chunk > 0: each device runs its users user_chunk at a time (comigs_jax.train.chunks;
    U must be a multiple of mesh size x user_chunk): the same per-user results, the activations
    of user_chunk users alive at once.
    """
    rep, users = replicated(mesh), user_sharded(mesh)
    shardings = dict(in_shardings=(rep, users, users, users, users), out_shardings=(users, users),
                     donate_argnums=(1,))
    if not user_chunk:
        fn = functools.partial(user_round, model_cfg=model_cfg, tc=tc, method=method, steps=steps, axis_name=USERS)
        vfn = jax.vmap(fn, in_axes=(None, 0, 0, 0, 0), axis_name=USERS, spmd_axis_name=USERS)
        return jax.jit(vfn, **shardings)
    # A router phase runs when any user of any device is due: the predicate is reduced over both
    # the devices and the chunk's users, so lax.cond stays a branch and not a select.
    fn = functools.partial(user_round, model_cfg=model_cfg, tc=tc, method=method, steps=steps,
                           axis_name=(USERS, CHUNK))
    vfn = jax.vmap(fn, in_axes=(None, 0, 0, 0, 0), axis_name=CHUNK)
    run = chunked(lambda base, states, xs: vfn(base, states, *xs), mesh, user_chunk)
    return jax.jit(lambda base, states, data, masks, active: run(base, states, (data, masks, active)), **shardings)


# The loop modes hold all users' state stacked, as the vmapped mode does; the reference instead
# keeps one model per user. One jitted gather per user (any u, one compile) and one jitted stack
# per round stand in for that, so the loops pay two dispatches per user for it, not one per leaf
# (~500 leaves for GPT-2 with its optimizer states: ~0.1 s per user on a GPU).
_user_slice = jax.jit(lambda tree, u: jax.tree.map(lambda x: x[u], tree))
_stack_users = jax.jit(lambda outs: jax.tree.map(lambda *xs: jnp.stack(xs), *outs))


def loop_round(model_cfg: ModelConfig, tc: TrainConfig, method: Method, steps: int):
    """The same round, jitted per user and looped over users in Python (reference structure)."""
    fn = jax.jit(functools.partial(user_round, model_cfg=model_cfg, tc=tc, method=method, steps=steps))

    def run(base, states, data, masks, active):
        n = masks.shape[0]
        outs = [fn(base, *_user_slice((states, data, masks, active), u)) for u in range(n)]
        return _stack_users(outs)

    return run


def loop_step_round(model_cfg: ModelConfig, tc: TrainConfig, method: Method, steps: int):
    """The round of `user_round`, one jitted training step per Python call, users in a Python
    loop: the structure of the reference PyTorch code (the benchmark's slowest baseline).

    `expert_step` and `router_phase` are jitted per user (no user axis, no scan over steps);
    the host decides when a router phase is due from the step counters, read once per round.
    Same signature, schedule, state and metrics as `loop_round`, so the results are equal.
    """
    kw = dict(model_cfg=model_cfg, tc=tc, method=method)
    e_step = jax.jit(functools.partial(expert_step, **kw))
    r_phase = jax.jit(functools.partial(router_phase, **kw))
    run_router = method.alternating and tc.router_steps > 0

    def one_user(base, state, data, mask, active, stop, step0):
        new, metrics = state, []
        data = with_prox_anchor(data, state.params, tc, method)
        for i in range(steps):
            kept = new
            new, m = e_step(new, base, data, mask)
            m = {k: v for k, v in m.items() if v is not None}
            if run_router:
                due = (step0 + min(i, stop) + 1) % tc.router_every == 0  # a dropped user's counter stops
                router_ce = jnp.zeros((), m["ce"].dtype)
                if due:
                    new, router_ce = r_phase(new, base, data, mask)
                m["router_ce"], m["router_phase"] = router_ce, jnp.asarray(due)
            if i >= stop:  # dropped out before this step: computed (for the metrics), not kept
                new = kept
            metrics.append(m)
        metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)
        return (new if active else state), metrics

    def run(base, states, data, masks, active):
        n = masks.shape[0]
        step0, act = np.asarray(states.step), np.asarray(active)  # one host sync per round
        # a bool per user (all steps kept or none), or the steps each user makes (drop-outs)
        keep, stops = (act, np.full(n, steps)) if act.dtype == bool else (np.ones(n, bool), act)
        outs = [one_user(base, *_user_slice((states, data, masks), u), bool(keep[u]), int(stops[u]), int(step0[u]))
                for u in range(n)]
        return _stack_users(outs)

    return run
