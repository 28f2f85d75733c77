"""The Llama reference's router: 2d42464's `TopKBalancedNoisyGate` (models/moe_experts.py), the
router kind "noisy_topk" (Llama family only; method.md Appendix A, docs/reproducing.md).

- Clean logits: Linear(d -> E) -> tanh -> Linear(E -> E), both without bias. The reference's
  `post_init` re-initialises every nn.Linear to N(0, initializer_range = 0.02) and its
  `from_pretrained` copies no `router_gate` weight, so both kernels start N(0, 0.02).
- Training (deterministic=False): logits = clean + eps * (softplus(x W_noise) + 0.01), eps ~ N(0, 1)
  drawn on every forward (expert and router steps alike), rng stream "router_noise". Evaluation:
  no noise.
- W_noise [d, E] is never trained and never communicated. The reference's constructor sets it to
  zeros, but `post_init` runs afterwards and draws it N(0, 0.02) like every Linear, and
  `from_pretrained` skips it: the noise scale is token-dependent, softplus(x . w_e) + 0.01, not a
  fixed softplus(0) + 0.01. Here it is not a parameter leaf: each layer draws it N(0, 0.02) from
  the fixed key of the rng stream "gate_w" (W_NOISE_SEED, split per layer), so it is the same
  constant on every forward, frozen and outside every communicated tree by construction (it is
  the same draw for every user, where the reference's users each draw their own).
- Gate: top-k of the (noisy) logits, softmax over the k selected (k = 1 included: weight 1).
- Balance loss of a layer: cv^2(importance) + cv^2(load), cv^2 = unbiased variance / (mean^2 +
  1e-10) over the experts, importance = the tokens' summed gate weights, load = the selection
  counts, or, in training with k < E, the smooth load sum_n P(e in top-k) with the Normal CDF
  (Shazeer et al., 2017, as the reference writes it: "is in" compares the noise term alone with
  the (k+1)-th noisy logit). The 0.01 weight, the sum over layers and the "> 0" rule are applied by
  the loss (comigs_jax.train.steps.lm_loss). No expert factors (`expert0_importance` is not
  forwarded in the reference), and the loss always reads the router's own input (no Q1).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from comigs_jax.model.config import MoEConfig
from comigs_jax.model.precision import wide

NOISE_EPSILON = 0.01  # gate_noise_epsilon
INIT_STD = 0.02  # initializer_range, the post_init draw of every Linear (W_noise included)
W_NOISE_SEED = 20250101  # the fixed key of the "gate_w" stream: W_noise is the same on every forward
RNG_STREAMS = ("router_noise", "gate_w")


def cv_squared(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """The reference's squared coefficient of variation of x [E]: unbiased variance / (mean^2 + eps);
    0 for a single expert."""
    if x.shape[-1] == 1:
        return jnp.zeros((), x.dtype)
    return x.var(ddof=1) / (x.mean() ** 2 + eps)


def noisy_topk_gate(clean: jax.Array, top_k: int, noise: jax.Array | None = None,
                    control: jax.Array | None = None) -> dict:
    """The gate of tokens [N, E]: clean logits, `noise` eps [N, E] and `control` (softplus(x W_noise)
    + 0.01) [N, E] in training, both None at evaluation. Returns weights [N, E] (the k selected
    experts' softmax, 0 elsewhere), logits (the noisy ones in training), importance [E], load [E]
    and balance = cv^2(importance) + cv^2(load) (unweighted)."""
    n_experts = clean.shape[-1]
    k = min(top_k, n_experts)
    noise_term = None if noise is None else noise * control
    logits = clean if noise is None else clean + noise_term
    top_vals, top_idx = jax.lax.top_k(logits, min(k + 1, n_experts))
    scores = jax.nn.softmax(top_vals[:, :k], axis=-1)
    weights = (jax.nn.one_hot(top_idx[:, :k], n_experts, dtype=scores.dtype) * scores[..., None]).sum(-2)
    importance = weights.sum(0)
    if noise is not None and k < n_experts:
        thr_in, thr_out = top_vals[:, k:k + 1], top_vals[:, k - 1:k]
        is_in = noise_term > thr_in  # the reference compares the noise alone (logits_noise)
        prob = jnp.where(is_in, norm.cdf((clean - thr_in) / control), norm.cdf((clean - thr_out) / control))
        load = prob.sum(0)
    else:
        load = (weights > 0).sum(0).astype(weights.dtype)
    return {"weights": weights, "logits": logits, "importance": importance, "load": load,
            "balance": cv_squared(importance) + cv_squared(load)}


class NoisyTopKRouter(nn.Module):
    """`per_token_router` (Linear -> tanh -> Linear, no biases; kernels `w_gate` [d, E], `w_mix`
    [E, E]) and the training noise of one layer. h [N, d] -> (clean [N, E], eps [N, E] | None,
    control [N, E] | None): eps ~ N(0, 1) from the "router_noise" stream, control = softplus(h W_noise)
    + 0.01, both None when deterministic."""

    n_experts: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, deterministic: bool = True):
        init = nn.initializers.normal(INIT_STD)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.param_dtype, param_dtype=self.param_dtype,
                                         kernel_init=init, name=name)
        clean = dense(self.n_experts, "w_mix")(jnp.tanh(dense(self.n_experts, "w_gate")(h)))
        if deterministic:
            return clean, None, None
        w_noise = INIT_STD * jax.random.normal(self.make_rng("gate_w"), (h.shape[-1], self.n_experts), self.param_dtype)
        self.sow("intermediates", "w_noise", w_noise)
        control = jax.nn.softplus(h @ w_noise) + NOISE_EPSILON
        return clean, jax.random.normal(self.make_rng("router_noise"), clean.shape, self.param_dtype), control


def mixture_weights(h: jax.Array, expert_mask, moe: MoEConfig, deterministic: bool):
    """moe_lib.mixture_weights for router "noisy_topk" (call it inside a block's compact method: the
    router becomes the submodule "router"). Returns (weights [..., E], mask [E], route) where
    route = the gate's dict for mixture_aux. Every user has all E experts (configuration refuses
    model.expert_counts with this router)."""
    mask = jnp.ones((moe.n_experts,), bool) if expert_mask is None else expert_mask
    f32 = wide(h.dtype)
    x = h.astype(f32).reshape(-1, h.shape[-1])
    clean, noise, control = NoisyTopKRouter(moe.n_experts, f32, name="router")(x, deterministic)
    out = noisy_topk_gate(clean, moe.top_k, noise, control)
    return out["weights"].reshape(*h.shape[:-1], moe.n_experts), mask, out


def mixture_aux(route: dict, mask: jax.Array) -> dict:
    """A block's aux: "lb" = the layer's cv^2(importance) + cv^2(load) (summed over layers, weighted
    and kept only when positive by the loss), "router_prob" (mean softmax of the gate's logits) and
    "selection" (the top-k shares) [E] each."""
    chosen = (route["weights"] > 0).astype(route["weights"].dtype)
    return {"lb": route["balance"], "router_prob": jax.nn.softmax(route["logits"], -1).mean(0),
            "selection": (chosen / chosen.sum(-1, keepdims=True)).mean(0) * mask}
