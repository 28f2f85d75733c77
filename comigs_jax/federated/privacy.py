"""User-level differential privacy of the shared leaves: DP-FedAvg's aggregation (McMahan et al.,
*Learning Differentially Private Recurrent Language Models*, ICLR 2018, Algorithm 1 with the
fixed-denominator estimator).

A stage that replaces the weighted mean of the uploads. Per federation g, with s the round-start
server value of the shared leaves (identical on every row of g) and x_i a row's upload:

    delta_i = x_i - s                                   # over all of the user's shared leaves
    clip(delta_i) = delta_i / max(1, ||delta_i||_2 / C) # optax.per_example_global_norm_clip's form
    noisy mean = s + (sum_{i in g uploading} clip(delta_i) + N(0, sigma^2 C^2 I)) / D

D is the expected number of participants: k for fixed-size sampling (k = max(1, round(q N))), q N
for Poisson sampling. The noise is drawn per federation from a key derived from the run's seed and
the round (`noise_keys`): resumed runs draw the same noise. Local leaves (specialists that are not
shared, routers) never leave the device: they are neither clipped nor noised and cost no privacy.
The accounting (epsilon at delta after t rounds) is comigs_jax.federated.accounting.

Pure and jittable; shapes: leaves [rows, ...], weights / groups [rows], keys [F, 2].
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from comigs_jax.federated.aggregate import _mean_over_users, _mean_within_groups
from comigs_jax.federated.roles import role_of, slot_axis
from comigs_jax.model.precision import wide

SAMPLINGS = ("fixed", "poisson")
NOISE_STREAM = 0x44500  # folded into PRNGKey(seed): the DP noise's own stream, apart from init and steps


class PrivacyError(ValueError):
    """A DP setting outside its limits: `key` (config key), `value`, what is `allowed` (one line)."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


@dataclasses.dataclass(frozen=True)
class DP:
    """The DP settings of a run (static: hashable, part of the server program's key).

    clip: C, the L2 bound of a user's update of its shared leaves (inf: no clipping).
    noise_multiplier: sigma; the noise on the sum has std sigma * C (the one a target calibrated).
    delta: the delta of the reported (epsilon, delta). target_epsilon: 0, or the epsilon sigma was
    calibrated to (comigs_jax.federated.accounting.calibrated). sampling: "fixed" (k of N users
    without replacement each round) or "poisson" (each user with probability q). q: the
    participation. n_users: users per federation (N). rounds: the planned rounds."""
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    target_epsilon: float = 0.0
    sampling: str = "fixed"
    q: float = 1.0
    n_users: int = 1
    rounds: int = 1

    def __post_init__(self):
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError("dp.noise_multiplier", self.noise_multiplier, "a finite number >= 0 (sigma)")
        if not self.clip > 0:  # nan fails too
            raise PrivacyError("dp.clip", self.clip, "a number > 0 (C; inf: no clipping)")
        if not 0 < self.delta < 1:
            raise PrivacyError("dp.delta", self.delta, "in (0, 1) (usually below 1 / the number of users)")
        if not (self.target_epsilon >= 0 and math.isfinite(self.target_epsilon)):
            raise PrivacyError("dp.target_epsilon", self.target_epsilon, "0 (use dp.noise_multiplier) or a finite "
                                                                         "epsilon > 0 to calibrate sigma to")
        if self.sampling not in SAMPLINGS:
            raise PrivacyError("federation.sampling", self.sampling, " | ".join(SAMPLINGS))
        if not 0 < self.q <= 1:
            raise PrivacyError("federation.participation", self.q, "in (0, 1] (q, the sampling probability)")
        if self.n_users < 1 or self.rounds < 1:
            raise PrivacyError("data.n_users" if self.n_users < 1 else "train.rounds",
                               min(self.n_users, self.rounds), "at least 1")

    @property
    def sample_size(self) -> int:
        """k, the participants of a round with fixed-size sampling (Simulation.sample_participants)."""
        return max(1, int(round(self.q * self.n_users)))

    @property
    def expected(self) -> float:
        """D, the expected number of participants per round: the estimator's fixed denominator."""
        return float(self.sample_size) if self.sampling == "fixed" else self.q * self.n_users


def check_federation(dp: DP, weighting: str, sampling: str, participation: float) -> None:
    """PrivacyError (one line) for a federation DP cannot run with."""
    if weighting != "uniform":
        raise PrivacyError("federation.weighting", weighting, "uniform with dp.enabled (each user's clipped update "
                                                              "counts once, so one user moves the sum by at most dp.clip)")
    if (dp.sampling, dp.q) != (sampling, participation):
        raise PrivacyError("dp", dp, f"the federation's sampling={sampling!r} and q=participation={participation}")


def check_method(dp: DP, method, ranks) -> None:
    """PrivacyError (one line) for a method DP-FedAvg does not apply to: only the mean of the
    shared leaves is privatised (a one-round method shares nothing after round 0)."""
    if method.server == "mean" and ranks is None:
        return
    what = ("shares nothing after round 0" if method.server == "none" else "mixes whole models (PCL)"
            if method.pcl is not None else "aggregates by rank" if ranks is None else "has per-user ranks (model.ranks)")
    raise PrivacyError("dp.enabled", True, f"False for method {method.name}, which {what}: DP-FedAvg privatises "
                                           "the mean of the shared leaves (methods whose server is the mean)")


def check_shares(method, attn_rank: int, n_experts: int, n_generalists: int) -> None:
    """PrivacyError (one line) when the model has no leaf of the method's shared roles (e.g. CoMiGS
    with model.n_generalists=0 and model.attn_rank=0): there is nothing to privatise."""
    held = {"attn": attn_rank > 0, "generalist": n_generalists > 0, "specialist": n_experts > n_generalists,
            "router": method.has_router}
    if not any(held[r] for r in method.shared_roles):
        raise PrivacyError("dp.enabled", True, f"False for method {method.name} with model.attn_rank={attn_rank}, "
                                               f"model.n_generalists={n_generalists}: it shares no leaf")


def noise_keys(seeds, round_index: int) -> np.ndarray:
    """[F, 2] uint32: federation f's noise key of the 0-indexed round, fold_in(fold_in(PRNGKey(seed_f),
    NOISE_STREAM), round): a function of the run's seed and the round only (resumes draw the same)."""
    out = [jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(int(s)), NOISE_STREAM), int(round_index))
           for s in seeds]
    return np.stack([np.asarray(k) for k in out]).astype(np.uint32)


def _slot_mask(path: tuple, x: jax.Array, n_shared_specialists: int | None):
    """A bool mask broadcastable to x of the shared part of leaf `path` (with heterogeneous expert
    counts only the first n_shared_specialists specialist slots are shared), or None: all of it."""
    axis = 1 + slot_axis(path)
    if role_of(path) != "specialist" or n_shared_specialists is None or n_shared_specialists >= x.shape[axis]:
        return None
    shape = [1] * x.ndim
    shape[axis] = -1
    return (jnp.arange(x.shape[axis]) < n_shared_specialists).reshape(shape)


def clip_divisors(updates: list, clip: float) -> jax.Array:
    """updates: leaves [rows, ...] -> [rows] max(1, ||update_row||_2 / C), the norm over all the
    leaves of a row (optax.tree.norm per row); dividing a row's update by it clips it to norm C."""
    norms = jax.vmap(optax.tree.norm)(updates)
    return jnp.maximum(norms / clip, 1.0)


def noisy_mean(setup, params: dict, up) -> dict:
    """`params` with every shared leaf replaced by its federation's DP estimate s + (sum of clipped
    updates + noise) / D (module docstring); other leaves unchanged. setup.dp: the DP record;
    up: Uploads with `round_start` (the round-start shared leaves, nested as params) and `noise_keys`.

    Written as sum_i (w_i / D) u_i + (1 - W / D) s + (sigma C / D) z, with u_i = x_i - (1 - 1/d_i)
    delta_i the clipped upload (d_i the clip divisor) and W = sum_i w_i the uploads, the same sums
    as the mean's (comigs_jax.federated.aggregate): with sigma = 0, C = inf and D = W (fixed-size
    sampling, everyone uploads) every extra term is an exact 0 and the result is the mean bit for bit."""
    dp, m = setup.dp, setup.method
    flat, start = traverse_util.flatten_dict(params), traverse_util.flatten_dict(up.round_start)
    paths = [p for p in flat if m.is_shared(p)]
    masks = {p: _slot_mask(p, flat[p], setup.n_shared_specialists) for p in paths}
    deltas = {p: flat[p] - start[p] if masks[p] is None else jnp.where(masks[p], flat[p] - start[p], 0) for p in paths}
    div = clip_divisors([deltas[p] for p in paths], dp.clip)  # [rows]
    w = up.weights.astype(jnp.float32)
    if setup.n_groups == 1:
        scale, total = w / dp.expected, jnp.sum(w)[None]
        mean = lambda u: _mean_over_users(u, scale)
    else:
        onehot = up.groups[None, :] == jnp.arange(setup.n_groups)[:, None]
        wg = onehot * w[None, :]
        total, scale = jnp.sum(wg, axis=1), wg / dp.expected
        mean = lambda u: _mean_within_groups(u, scale, up.groups)
    rest = jnp.take(1.0 - total / dp.expected, up.groups if setup.n_groups > 1 else jnp.zeros_like(up.groups))
    out = dict(flat)
    for i, p in enumerate(paths):
        x, s = flat[p], start[p]
        row = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))
        u = x - (row(1.0 - 1.0 / div) * deltas[p]).astype(x.dtype)
        new = mean(u) + (row(rest) * s.astype(wide(x.dtype))).astype(x.dtype)
        if dp.noise_multiplier > 0:
            z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], wide(x.dtype)))(
                up.noise_keys)  # [F, ...]: one draw per federation
            z = jnp.take(z, up.groups, axis=0) if setup.n_groups > 1 else z[0][None]
            new = new + (z * (dp.noise_multiplier * dp.clip / dp.expected)).astype(x.dtype)
        out[p] = new if masks[p] is None else jnp.where(masks[p], new, x)
    return traverse_util.unflatten_dict(out)


def shared_start(method, params: dict) -> dict:
    """The shared leaves of `params` (nested as params): what a DP server needs of the round start."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: jnp.copy(x) for p, x in flat.items() if method.is_shared(p)})
