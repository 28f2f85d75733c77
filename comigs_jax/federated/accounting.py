"""The privacy spent by DP-FedAvg (comigs_jax.federated.privacy): epsilon at delta after t rounds,
from `dp_accounting`'s RDP accountant, with the event of the sampling the run uses:

- Poisson sampling (each user with probability q): PoissonSampledDpEvent(q, GaussianDpEvent(sigma))
  per round, add-or-remove-one-user adjacency (the sum's sensitivity is C, the noise sigma C).
- Fixed-size sampling (k of N users without replacement): SampledWithoutReplacementDpEvent(N, k,
  GaussianDpEvent(sigma / 2)) per round, replace-one-user adjacency, the only relation
  dp_accounting accounts this sampling under (Wang, Balle, Kasiviswanathan, AISTATS 2019). Replacing
  a user moves the clipped sum by up to 2 C, so the noise is sigma / 2 times that sensitivity: a
  conservative bound (the adjacency is also a stronger one).

`calibrated(dp)` finds the smallest sigma whose epsilon after dp.rounds rounds is at most
dp.target_epsilon (dp_accounting.calibrate_dp_mechanism); PrivacyError (one line) when none up
to MAX_SIGMA reaches it. dp_accounting is the `dp` extra (comigs_jax.extras).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

from comigs_jax import extras
from comigs_jax.federated.privacy import DP, PrivacyError

MAX_SIGMA = 1000.0  # above this the noise on the mean (sigma C / D) dwarfs any update a run could learn from
MIN_SIGMA = 0.01  # the calibration's lower end: a target this little noise already meets gets it
ACCOUNTANT = "RDP (dp_accounting.rdp.RdpAccountant, its default orders)"


@contextlib.contextmanager
def _quiet():
    """dp_accounting logs (absl) each fractional RDP order its series does not converge at and
    drops; the orders left give a valid bound. Silenced while it runs."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def round_event(dp: DP, sigma: float | None = None):
    """The DpEvent of one round of `dp` (its sampling) at noise multiplier `sigma` (default dp's)."""
    dpa = extras.require("dp_accounting")
    sigma = dp.noise_multiplier if sigma is None else sigma
    if dp.sampling == "poisson":
        return dpa.PoissonSampledDpEvent(dp.q, dpa.GaussianDpEvent(sigma))
    return dpa.SampledWithoutReplacementDpEvent(dp.n_users, dp.sample_size, dpa.GaussianDpEvent(sigma / 2))


def accountant(dp: DP):
    """A fresh RDP accountant with the adjacency of dp's sampling (module docstring)."""
    dpa = extras.require("dp_accounting")
    rel = dpa.NeighboringRelation
    return dpa.rdp.RdpAccountant(neighboring_relation=rel.ADD_OR_REMOVE_ONE if dp.sampling == "poisson"
                                 else rel.REPLACE_ONE)


@functools.lru_cache(maxsize=4096)
def epsilon(dp: DP, rounds: int) -> float:
    """epsilon at dp.delta after `rounds` rounds (inf for sigma = 0: nothing is private)."""
    if dp.noise_multiplier == 0:
        return float("inf")
    dpa = extras.require("dp_accounting")
    acc = accountant(dp)
    with _quiet():
        acc.compose(dpa.SelfComposedDpEvent(round_event(dp), int(rounds)))
        return float(acc.get_epsilon(dp.delta))


@functools.lru_cache(maxsize=256)
def calibrated(dp: DP) -> DP:
    """dp with sigma the smallest noise multiplier in [MIN_SIGMA, MAX_SIGMA] (to 1e-3) whose epsilon
    after dp.rounds rounds at dp.delta is at most dp.target_epsilon; dp itself without a target."""
    if not dp.target_epsilon:
        return dp
    dpa = extras.require("dp_accounting")
    event = lambda s: dpa.SelfComposedDpEvent(round_event(dp, s), dp.rounds)
    with _quiet():
        if _epsilon_at(dp, MAX_SIGMA) > dp.target_epsilon:
            raise PrivacyError("dp.target_epsilon", dp.target_epsilon,
                               f"an epsilon the accountant can reach at dp.delta={dp.delta} in train.rounds="
                               f"{dp.rounds} rounds with sigma <= {MAX_SIGMA:g} (that sigma gives "
                               f"{_epsilon_at(dp, MAX_SIGMA):.3g}); raise it, dp.delta or federation.participation's "
                               "amplification (a smaller q), or plan fewer rounds")
        if _epsilon_at(dp, MIN_SIGMA) <= dp.target_epsilon:
            return dataclasses.replace(dp, noise_multiplier=MIN_SIGMA)
        sigma = dpa.calibrate_dp_mechanism(lambda: accountant(dp), event, dp.target_epsilon, dp.delta,
                                           dpa.LowerEndpointAndGuess(MIN_SIGMA, 1.0), tol=1e-3)
    return dataclasses.replace(dp, noise_multiplier=float(sigma))


def _epsilon_at(dp: DP, sigma: float) -> float:
    return epsilon(dataclasses.replace(dp, noise_multiplier=sigma), dp.rounds)


def from_config(cfg) -> DP | None:
    """The run's DP settings from an experiment config (configs/base.py's dp group, its
    federation's sampling and q, users and rounds), sigma calibrated; None without dp.enabled."""
    d = cfg.get("dp")
    if d is None or not d.enabled:
        return None
    fe = cfg.federation
    return calibrated(DP(float(d.clip), float(d.noise_multiplier), float(d.delta), float(d.target_epsilon),
                         fe.get("sampling", "fixed"), float(fe.participation), int(cfg.data.n_users),
                         int(cfg.train.rounds)))


def report(dp: DP, rounds: int, method) -> dict:
    """results.json's `privacy`: epsilon at delta after the run's rounds, the mechanism, the event
    and accountant, and what is protected (the shared leaves) and what never leaves the device."""
    roles = ("attn", "generalist", "specialist") + (("router",) if method.has_router else ())
    local = [r for r in roles if r not in method.shared_roles]
    local += [f"{r}.{f}" for r in method.shared_roles if r != "router" for f in "AB" if f not in method.shared_factors]
    return {
        "epsilon": epsilon(dp, rounds), "delta": dp.delta, "rounds": rounds,
        "noise_multiplier": dp.noise_multiplier, "clip": dp.clip, "target_epsilon": dp.target_epsilon or None,
        "sampling": dp.sampling, "q": dp.q, "users": dp.n_users, "expected_participants": dp.expected,
        "noise_std_on_mean": dp.noise_multiplier * dp.clip / dp.expected,
        "event": ("PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), add-or-remove-one user" if dp.sampling == "poisson"
                  else "SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(sigma / 2)), replace-one user "
                       "(sensitivity 2 C: conservative)"),
        "accountant": ACCOUNTANT, "unit": "user (all of a user's data, every round)",
        "protected": f"the shared leaves ({', '.join(method.shared_roles)}): each upload's update clipped to C, "
                     "Gaussian noise on their sum",
        "local": (f"{', '.join(local)}: never leave the device and cost no privacy" if local else
                  "none: every trained leaf is shared, clipped and noised"),
    }
