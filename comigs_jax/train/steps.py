"""One user's steps: batch sampling, the loss, an expert step, a router step, evaluation.

Every function here sees ONE user (no user axis); comigs_jax.train.rounds vmaps them over users
or calls them in a Python loop. Shapes: tokens [N] (padded), length scalar, mask [E].

`data` is the row's inputs: tokens and lengths of its splits and, when federations with different
hyper-parameters share one program, data["hparams"]: {name: scalar} overriding the static
TrainConfig's lr / router_lr / lb_weight / weight_decay / prune_lambda / prox_mu (state.ROW_HPARAMS)
for this row. With FedProx's term on (`prox_weight`), data["prox_anchor"] holds the row's shared
leaves as the round started (comigs_jax.train.rounds adds it, `with_prox_anchor`).
With per-user LoRA ranks (comigs_jax.federated.ranks), data["rank_scale"] [r_max] is the row's rank
scale (the model sees A * scale, B masked; masked components are zeroed after every expert
step) and data["rank_full"] its configured rank (the pruning regulariser's tail); with a rank per
LoRA module (HetLoRA as the reference), data["rank_modules"] [M] masks each module to its own.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from comigs_jax.federated.methods import Method
from comigs_jax.federated.ranks import apply_rank_scale, mask_ranks, prune_rank, pruning_penalty
from comigs_jax.federated.roles import filter_leaves, merge, role_of
from comigs_jax.model.head import token_cross_entropy
from comigs_jax.model import noisy_gate
from comigs_jax.model.lm import ModelConfig, head_matrix, language_model
from comigs_jax.model.precision import wide
from comigs_jax.train.state import (TrainConfig, UserState, expert_optimizer, hparam, is_expert_leaf,
                                    leaks_active, router_optimizer)


def sample_windows(key: jax.Array, tokens: jax.Array, length: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """[batch, seq_len + 1] random windows, starts uniform in [0, length - seq_len - 1], with
    replacement (the reference sampler): never past the user's true length into padding."""
    starts = jax.random.randint(key, (batch,), 0, length - seq_len)
    return tokens[starts[:, None] + jnp.arange(seq_len + 1)].astype(jnp.int32)


def lm_loss(trainable: dict, base: dict, windows: jax.Array, mask: jax.Array, model_cfg: ModelConfig,
            lb_weight: float, dropout_key: jax.Array | None = None):
    """Mean next-token cross-entropy + lb_weight * (mean over layers of the balance loss).

    windows [B, T + 1]. Returns (loss, metrics) with ce, lb and routing statistics [L, E].
    The head's cross-entropy runs in vocabulary blocks of model_cfg.head_block (no
    [B, T, V] logits; 0 = full logits).
    """
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    noisy = model_cfg.moe is not None and model_cfg.moe.router == "noisy_topk"
    if noisy and rngs is not None:  # the Llama reference's gate: fresh noise, the fixed W_noise (model/noisy_gate.py)
        rngs.update(router_noise=jax.random.fold_in(dropout_key, 1), gate_w=jax.random.key(noisy_gate.W_NOISE_SEED))
    params = merge(base, trainable)
    hidden, aux = language_model(model_cfg).apply({"params": params}, windows[:, :-1], mask,
                                                  deterministic=dropout_key is None, rngs=rngs, return_hidden=True)
    ce = token_cross_entropy(hidden, head_matrix(params, model_cfg), windows[:, 1:], model_cfg.head_block).mean()
    lb = (aux["lb"].sum() if noisy else aux["lb"].mean()) if aux else jnp.zeros((), ce.dtype)
    # noisy_topk: the reference's sum over layers, added only when positive
    loss = ce + (jnp.where(lb_weight * lb > 0, lb_weight * lb, 0.0) if noisy else lb_weight * lb)
    return loss, {"loss": loss, "ce": ce, "lb": lb,
                  "router_prob": aux.get("router_prob"), "selection": aux.get("selection")}


def _every_leaf(path) -> bool:
    return True


def _is_router(path) -> bool:
    return role_of(path) == "router"


def proximal_term(params: dict, anchor: dict) -> jax.Array:
    """FedProx's 1/2 ||w - w_round_start||^2 (Li et al., MLSys 2020) over the leaves of `anchor`
    (the shared leaves at the round's start; `params` holds them and others), summed in float32
    (float64 for float64 leaves)."""
    flat = traverse_util.flatten_dict(params)
    sq = [jnp.sum(jnp.square((flat[p] - a).astype(wide(a.dtype)))) for p, a in traverse_util.flatten_dict(anchor).items()]
    return 0.5 * sum(sq) if sq else jnp.zeros(())


def _grads(keep, params, base, windows, mask, model_cfg, lb_weight, dropout_key, data=None, prune=None, prox=None):
    """Loss and gradients with respect to the leaves whose path satisfies keep(path) only (the rest
    held fixed). data["rank_scale"] (when given): the row's rank scale, applied to the model's
    view of the params. prune: the pruning regulariser's weight (None: off). prox: FedProx's mu
    (None: off), the term's anchor data["prox_anchor"]."""
    wrt = filter_leaves(params, keep)
    rest = filter_leaves(params, lambda p: not keep(p))
    scale = (data or {}).get("rank_scale")

    def fn(p):
        full = merge(p, rest)
        view = full if scale is None else apply_rank_scale(full, scale, data.get("rank_modules"))
        loss, metrics = lm_loss(view, base, windows, mask,
                                model_cfg, lb_weight, dropout_key)
        if prune is not None:
            r_full = data.get("rank_full", model_cfg.moe.lora.rank)
            penalty = pruning_penalty(full, prune_rank(r_full), r_full, mask)
            loss = loss + prune * penalty
            metrics = {**metrics, "prune": penalty}
        if prox is not None:
            term = proximal_term(full, data["prox_anchor"])
            loss = loss + prox * term
            metrics = {**metrics, "prox": term}
        return loss, metrics

    (_, metrics), grads = jax.value_and_grad(fn, has_aux=True)(wrt)
    return metrics, grads


def _prune_weight(tc: TrainConfig, hp):
    """The pruning regulariser's weight (a per-row value when federations differ in it), or None
    when it is off."""
    return hparam(tc, hp, "prune_lambda") if (hp and "prune_lambda" in hp) or tc.prune_lambda > 0 else None


def prox_weight(tc: TrainConfig, hp):
    """FedProx's mu (a per-row value when federations differ in it), or None when it is off: then
    the step is the program without the term."""
    return hparam(tc, hp, "prox_mu") if (hp and "prox_mu" in hp) or tc.prox_mu > 0 else None


def with_prox_anchor(data: dict, params: dict, tc: TrainConfig, method: Method) -> dict:
    """data with the row's shared leaves at the round's start (FedProx's w_round_start) when the
    proximal term is on, else data as it is (one row: no user axis)."""
    if prox_weight(tc, data.get("hparams")) is None:
        return data
    return {**data, "prox_anchor": filter_leaves(params, method.is_shared)}


def _needs_dropout_key(model_cfg: ModelConfig) -> bool:
    noisy = model_cfg.moe is not None and model_cfg.moe.router == "noisy_topk"  # its noise: every training forward
    return noisy or any(l is not None and l.dropout > 0 for l in (model_cfg.attn_lora, model_cfg.moe and model_cfg.moe.lora))


def expert_step(state: UserState, base: dict, data: dict, mask: jax.Array, *,
                model_cfg: ModelConfig, tc: TrainConfig, method: Method) -> tuple[UserState, dict]:
    """One expert step on a TRAINING batch: updates attention and expert LoRA (and, in joint
    mode, the router); increments the step counter. In faithful mode it also adds the LoRA
    gradients leaked by the last router phase (D1) and banks its router gradient (D2)."""
    hp = data.get("hparams")
    key, k_batch, k_drop = jax.random.split(state.key, 3)
    windows = sample_windows(k_batch, data["train"], data["train_len"], tc.batch_size, tc.seq_len)
    leaks = leaks_active(tc, method)
    trains = is_expert_leaf(method)
    metrics, grads = _grads(_every_leaf if leaks else trains, state.params, base, windows, mask,
                            model_cfg, hparam(tc, hp, "lb_weight"), k_drop if _needs_dropout_key(model_cfg) else None,
                            data, _prune_weight(tc, hp), prox_weight(tc, hp))
    g = filter_leaves(grads, trains)
    leak = state.leak
    if leaks:
        g = jax.tree.map(jnp.add, g, leak["expert"])
        leak = {"expert": jax.tree.map(jnp.zeros_like, leak["expert"]),
                "router": jax.tree.map(jnp.add, leak["router"], filter_leaves(grads, _is_router))}
    p = filter_leaves(state.params, trains)
    updates, opt = expert_optimizer(tc, hp).update(g, state.opt_expert, p)
    params = merge(optax.apply_updates(p, updates), filter_leaves(state.params, lambda q: not trains(q)))
    if "rank_scale" in data:  # components beyond the row's rank stay 0 (Adam's momentum would move them)
        params = mask_ranks(params, data["rank_scale"], data.get("rank_modules"))
    return state.replace(params=params, opt_expert=opt, step=state.step + 1, key=key, leak=leak), metrics


def router_step(state: UserState, base: dict, data: dict, mask: jax.Array, *,
                model_cfg: ModelConfig, tc: TrainConfig, method: Method) -> tuple[UserState, dict]:
    """One router step on a VALIDATION batch (TRAINING batch for alternating_train): updates
    the routers only. In faithful mode, the router gradient banked by the expert steps is added
    (D2, then cleared) and this step's LoRA gradient is banked for the next expert step (D1)."""
    split = "valid" if method.router_mode == "bilevel" else "train"
    hp = data.get("hparams")
    key, k_batch, k_drop = jax.random.split(state.key, 3)
    windows = sample_windows(k_batch, data[split], data[f"{split}_len"], tc.batch_size, tc.seq_len)
    leaks = leaks_active(tc, method)
    metrics, grads = _grads(_every_leaf if leaks else _is_router, state.params, base, windows, mask,
                            model_cfg, hparam(tc, hp, "lb_weight"), k_drop if _needs_dropout_key(model_cfg) else None,
                            data)
    g = filter_leaves(grads, _is_router)
    leak = state.leak
    if leaks:
        g = jax.tree.map(jnp.add, g, leak["router"])
        leak = {"expert": jax.tree.map(jnp.add, leak["expert"], filter_leaves(grads, is_expert_leaf(method))),
                "router": jax.tree.map(jnp.zeros_like, leak["router"])}
    p = filter_leaves(state.params, _is_router)
    updates, opt = router_optimizer(tc, hp).update(g, state.opt_router, p)
    params = merge(optax.apply_updates(p, updates), filter_leaves(state.params, lambda q: not _is_router(q)))
    return state.replace(params=params, opt_router=opt, key=key, leak=leak), metrics


def evaluate_user(params: dict, base: dict, tokens: jax.Array, starts: jax.Array, weights: jax.Array,
                  mask: jax.Array, *, model_cfg: ModelConfig, seq_len: int, batch: int) -> dict[str, Any]:
    """Per-batch sums over the windows starting at `starts` [n] (n a multiple of `batch`), each
    window weighted by `weights` [n] (0 = padding, comigs_jax.train.evaluation.eval_windows).

    Returns [n / batch] arrays: ce_sum (sum over weighted windows of their summed token
    cross-entropies, computed in float32), weight (sum of window weights), and the batch means
    of the load-balancing loss and routing statistics ([L, E]); the caller reduces them (the
    token-mean CE is sum(ce_sum) / (sum(weight) * seq_len))."""
    model = language_model(model_cfg)
    variables = {"params": merge(base, params)}
    embedding = head_matrix(variables["params"], model_cfg)

    def one_batch(sw):
        s, w = sw
        windows = tokens[s[:, None] + jnp.arange(seq_len + 1)].astype(jnp.int32)
        hidden, aux = model.apply(variables, windows[:, :-1], mask, deterministic=True, return_hidden=True)
        # [batch, seq_len] float32, in vocabulary blocks of model_cfg.head_block: no [batch, seq, V] logits.
        ce = token_cross_entropy(hidden, embedding, windows[:, 1:], model_cfg.head_block)
        out = {"ce_sum": (ce.sum(1) * w).sum(), "weight": w.sum()}
        if aux:
            out["lb"] = aux["lb"].mean()
            out.update({k: aux[k] for k in ("router_prob", "selection") if aux.get(k) is not None})
        return out

    return jax.lax.map(one_batch, (starts.reshape(-1, batch), weights.reshape(-1, batch)))
