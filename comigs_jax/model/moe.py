"""Mixture of LoRA experts: gating, load balancing, routing statistics, and the expert MLP.

Gating and load balancing follow the reference (method.md §1.5, §1.6) exactly. Users with
fewer experts than E_max carry an expert mask [E]; absent experts get logit -inf before top-k,
are never selected, and are left out of the load-balancing loss.

Shapes: logits [..., E] (any leading token axes), mask [E] bool.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from comigs_jax.model.config import MoEConfig
from comigs_jax.model.lora import expert_a_init
from comigs_jax.model.precision import wide


def masked_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Absent experts get -inf: never selected, zero probability."""
    return jnp.where(mask, logits.astype(wide(logits.dtype)), -jnp.inf)


def _selected(z: jax.Array, mask: jax.Array, top_k: int) -> jax.Array:
    """[..., E] 0/1 indicator of the top-k of z among the present experts."""
    n_experts = z.shape[-1]
    _, idx = jax.lax.top_k(z, min(top_k, n_experts))
    return jax.nn.one_hot(idx, n_experts, dtype=z.dtype).sum(-2) * mask


def gate(logits: jax.Array, mask: jax.Array, top_k: int) -> jax.Array:
    """Per-token expert weights [..., E] from router logits [..., E] (method.md §1.5).

    k >= 2: top-k of the raw logits, softmax over those k (renormalised), 0 elsewhere.
    k == 1: softmax over all present experts; the argmax keeps p_max (not renormalised).
    A user with one present expert gets weight exactly 1 for it (the reference's bypass).
    """
    z = masked_logits(logits, mask)
    n_experts = z.shape[-1]
    if top_k == 1:
        p = jax.nn.softmax(z, axis=-1)
        return jax.nn.one_hot(jnp.argmax(p, -1), n_experts, dtype=p.dtype) * p.max(-1, keepdims=True)
    vals, idx = jax.lax.top_k(z, min(top_k, n_experts))
    w_sel = jax.nn.softmax(vals, axis=-1)  # absent experts picked when k > E_i: weight exp(-inf) = 0
    return (jax.nn.one_hot(idx, n_experts, dtype=w_sel.dtype) * w_sel[..., None]).sum(-2)


def uniform_weights(mask: jax.Array, shape) -> jax.Array:
    """No router: every present expert weighs 1/E_i. Returns [*shape, E]."""
    w = mask.astype(jnp.float32) / mask.sum()
    return jnp.broadcast_to(w, (*shape, mask.shape[-1]))


def expert_factors(mask: jax.Array, importance: float) -> jax.Array:
    """[E] factors that pull expert 0's share towards `importance` (0 disables them).

    f_0 = 1 / (E_i imp), f_j = (E_i - 1) / (E_i (1 - imp)), with E_i the present experts.
    """
    n = mask.sum().astype(jnp.float32)
    if importance == 0:
        return jnp.ones(mask.shape, jnp.float32)
    f0 = 1.0 / (n * importance)
    fj = (n - 1.0) / (n * (1.0 - importance))
    return jnp.where(jnp.arange(mask.shape[-1]) == 0, f0, fj)


def load_balancing_loss(logits: jax.Array, mask: jax.Array, top_k: int, importance: float) -> jax.Array:
    """Switch-style balance loss of one layer as the reference computes it (method.md §1.6).

    logits [..., E] are the router applied to the tokens of one batch. Returns a scalar,
    E_i^2 * mean over present e of f_e * density_e * proxy_e. It is exactly 1 with zero
    gradient when E = k = 2 and importance = 0.5.
    """
    z = masked_logits(logits, mask).reshape(-1, mask.shape[-1])
    n = mask.sum().astype(jnp.float32)
    if top_k == 1:
        z = jax.nn.softmax(z, axis=-1)
    sel = _selected(z, mask, top_k)
    if top_k > 1:  # zeros (not -inf) for present unselected experts, as the reference
        q = jax.nn.softmax(jnp.where(sel > 0, z, jnp.where(mask, 0.0, -jnp.inf)), axis=-1)
    else:
        q = jnp.where(sel > 0, z, 0.0)
    k_i = jnp.minimum(top_k, n)
    density = jax.lax.stop_gradient((sel / k_i).mean(0))
    proxy = q.mean(0)
    f = expert_factors(mask, importance)
    return n * jnp.sum(jnp.where(mask, f * density * proxy, 0.0))


def routing_stats(logits: jax.Array, mask: jax.Array, top_k: int) -> dict:
    """Per-expert mean router probability softmax(z) and top-k selection share, [E] each.

    The selection share sums to 1 over experts (each token spreads 1 over its k_i choices).
    """
    z = masked_logits(logits, mask).reshape(-1, mask.shape[-1])
    k_i = jnp.minimum(top_k, mask.sum())
    return {
        "router_prob": jax.nn.softmax(z, -1).mean(0),
        "selection": (_selected(z, mask, top_k) / k_i).mean(0),
    }


class UserRouter(nn.Module):
    """A router without token input: one learned float32 logit vector [E] (`logits`, N(0, 0.02)
    at init like the token router's kernel: near-uniform) broadcast to every token of h [..., d]
    -> [..., E]."""

    n_experts: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        logits = self.param("logits", nn.initializers.normal(0.02), (self.n_experts,), self.param_dtype)
        return jnp.broadcast_to(logits, (*h.shape[:-1], self.n_experts))


def mixture_weights(h: jax.Array, expert_mask, moe: MoEConfig):
    """A block's expert weights: (weights [..., E] over h's [..., d] leading axes, mask [E], route).

    Call it inside a block's compact method: the learned router becomes that block's submodule
    "router" (parameters `<block>/router/kernel`; with moe.router == "user" `<block>/router/logits`
    [E], the same weights for every token), with float32 logits whatever the activation dtype
    (top-k is sensitive). route = (router, logits) for mixture_aux; None for "uniform"."""
    mask = jnp.ones((moe.n_experts,), bool) if expert_mask is None else expert_mask
    if moe.router == "uniform":
        return uniform_weights(mask, h.shape[:-1]), mask, None
    f32 = wide(h.dtype)  # float32 (float64 for a float64 model)
    if moe.router == "user":
        router = UserRouter(moe.n_experts, f32, name="router")
    else:
        router = nn.Dense(moe.n_experts, use_bias=False, dtype=f32, param_dtype=f32,
                          kernel_init=nn.initializers.normal(0.02), name="router")
    logits = router(h.astype(f32))
    return gate(logits, mask, moe.top_k), mask, (router, logits)


def mixture_aux(route, x: jax.Array, mask: jax.Array, moe: MoEConfig) -> dict:
    """A block's aux after its mixture (x: the block output): "lb" (scalar), "router_prob" and
    "selection" ([E] each); route from mixture_weights. The balance loss reads the router's logits
    of the block input, or of x with moe.lb_input == "block_output"."""
    if route is None:
        share = mask / mask.sum()
        return {"lb": jnp.zeros((), jnp.float32), "router_prob": share, "selection": share}
    router, logits = route
    lb_logits = router(x.astype(wide(x.dtype))) if moe.lb_input == "block_output" else logits
    return {"lb": load_balancing_loss(lb_logits, mask, moe.top_k, moe.importance),
            **routing_stats(logits, mask, moe.top_k)}


class FrozenDense(nn.Module):
    """Declares a frozen kernel [d_in, d_out] and bias [d_out] and returns them."""

    d_in: int
    d_out: int
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", self.kernel_init, (self.d_in, self.d_out), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.d_out,), jnp.float32)
        return kernel, bias


class ExpertLoRAs(nn.Module):
    """The LoRA factors of n experts on an MLP's matmuls, stacked on a leading expert axis.

    matmuls: (name, d_in, d_out) for each matmul, in order; each gets <name>_A [n, d_in, r] and
    <name>_B [n, r, d_out] (B at zero: a new expert is the frozen MLP). Returns (A, B) of every
    matmul in that order, flat. GPT-2: fc [d -> 4d], proj [4d -> d].
    """

    n: int
    rank: int
    matmuls: tuple
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        n, r, out = self.n, self.rank, ()
        for name, d_in, d_out in self.matmuls:
            out += (self.param(f"{name}_A", expert_a_init, (n, d_in, r), self.param_dtype),
                    self.param(f"{name}_B", nn.initializers.zeros, (n, r, d_out), self.param_dtype))
        return out


def _expert_core(u, h_a, fc_b, w, proj_a, drop_key, *, scale: float, keep_prob: float):
    """Every expert's own part of the MLP: its correction, GELU, mixing and proj_A product.

    u [N, F] frozen c_fc output, h_a [N, E, r] = h A_fc, fc_b [E, r, F], w [N, E], proj_a [E, F, r]
    -> mixed [N, F] = sum_e w_e g_e, g_a [E, N, r] = dropout(g_e) A_proj, g = GELU(u + s h_a B_fc).
    The pre-activation [E, N, F] is named "moe_pre" so a checkpoint policy can keep it alone.
    """
    corr = jnp.einsum("ner,erf->enf", h_a, fc_b)                                   # [E, N, F]
    pre = checkpoint_name(u[None] + scale * corr, "moe_pre")                       # [E, N, F]
    g = nn.gelu(pre, approximate=True)                                             # [E, N, F]
    mixed = jnp.einsum("ne,enf->nf", w, g)                                         # [N, F]
    if drop_key is not None:  # nn.Dropout's own formula, so the mask equals the module's
        keep = jax.random.bernoulli(drop_key, p=keep_prob, shape=g.shape)
        g = jax.lax.select(keep, g / keep_prob, jnp.zeros_like(g))
    g_a = jnp.einsum("enf,efr->enr", g, proj_a)                                     # [E, N, r]
    return mixed, g_a


# What the backward keeps of _expert_core: by default only the pre-activation (tanh and GELU are
# recomputed from it: one [E, N, F] instead of six); with remat "moe" nothing [E, N, F] at all
# (corr and pre are recomputed from u, h_a and the weights). GPUs and TPUs honour this; XLA's CPU
# pipeline removes the optimization barriers jax.checkpoint relies on (its cse_barrier_expander
# pass) before CSE, which folds the recomputation back into the forward pass, so on CPU the
# compiled memory is unchanged unless XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander.
CORE_POLICY = {"none": jax.checkpoint_policies.save_only_these_names("moe_pre"),
                "block": jax.checkpoint_policies.save_only_these_names("moe_pre"),
                "moe": jax.checkpoint_policies.nothing_saveable}


class MoEMLP(nn.Module):
    """sum_e w_e expert_e(h), expert_e = the frozen GPT-2 MLP with expert e's own LoRA.

    Computed in the equivalent cheap form (method.md §1.4): the frozen c_fc matmul runs once,
    each expert adds its rank-r correction and its own GELU, and the frozen c_proj matmul runs
    once on the weight-mixed activations. h [B, T, d], weights [B, T, E] -> [B, T, d].
    The per-expert part runs under jax.checkpoint (_expert_core, policy by `remat`, one of
    config.REMAT): the backward keeps at most one [E, N, F] tensor, in the activation dtype.
    """

    cfg: MoEConfig
    d_model: int
    n_layer: int
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, h: jax.Array, weights: jax.Array, deterministic: bool = True) -> jax.Array:
        d, f, r = self.d_model, 4 * self.d_model, self.cfg.lora.rank
        dt, s = self.dtype, self.cfg.lora.scale
        w_fc, b_fc = FrozenDense(d, f, name="c_fc")()
        w_proj, b_proj = FrozenDense(
            f, d, nn.initializers.normal(0.02 / (2 * self.n_layer) ** 0.5), name="c_proj")()
        groups = [ExpertLoRAs(n, r, (("fc", d, f), ("proj", f, d)), wide(dt), name=name)()
                  for name, n in (("generalists", self.cfg.n_generalists),
                                  ("specialists", self.cfg.n_specialists)) if n > 0]
        fc_a, fc_b, proj_a, proj_b = (jnp.concatenate(parts, 0).astype(dt) for parts in zip(*groups))

        rate = self.cfg.lora.dropout
        drop = nn.Dropout(rate)
        det = deterministic or rate == 0
        lead, n_e = h.shape[:-1], fc_a.shape[0]
        h = h.astype(dt).reshape(-1, d)                                        # [N, d]
        w = weights.astype(dt).reshape(-1, n_e)                                # [N, E]
        u = h @ w_fc.astype(dt) + b_fc.astype(dt)                              # [N, F]: once for all experts
        # Expert-major layout [E, N, .]: batched matmuls with a leading batch axis (fast on CPU/GPU).
        h_a = (drop(h, deterministic=det) @ fc_a.transpose(1, 0, 2).reshape(d, n_e * r)).reshape(-1, n_e, r)
        # The key the Dropout module's second call would draw, so the mask is the same as applying
        # `drop` to g; drawn out here because the checkpointed core is a plain function.
        drop_key = None if det else drop.make_rng("dropout")
        core = jax.checkpoint(functools.partial(_expert_core, scale=s, keep_prob=1.0 - rate),
                              policy=CORE_POLICY[self.remat])
        mixed, g_a = core(u, h_a, fc_b, w, proj_a, drop_key)                   # [N, F], [E, N, r]
        g_a = (w.T[..., None] * g_a).transpose(1, 0, 2).reshape(-1, n_e * r)    # [N, E*r]
        lora_out = g_a @ proj_b.reshape(n_e * r, d)                            # [N, d]
        out = mixed @ w_proj.astype(dt) + w.sum(-1, keepdims=True) * b_proj.astype(dt) + s * lora_out
        return out.reshape(*lead, d)
