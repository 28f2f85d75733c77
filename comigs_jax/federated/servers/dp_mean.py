"""DP-FedAvg's aggregation (comigs_jax.federated.privacy): the shared leaves become the round-start
server value plus the clipped, noised mean update of the users that uploaded, within each
federation. Chosen by servers.server_for for a method whose server is the mean when the run has
DP (dp.enabled); needs the round-start shared leaves (Uploads.round_start) and the noise keys."""
from __future__ import annotations

from comigs_jax.federated.privacy import noisy_mean
from comigs_jax.federated.server import Server, Setup, Uploads


def apply(setup: Setup, params: dict, up: Uploads, state: dict):
    return noisy_mean(setup, params, up), state


SERVER = Server("dp_mean", apply, needs_start=True,
                description="DP-FedAvg: round-start value + (sum of updates clipped to C + N(0, sigma^2 C^2)) / "
                            "expected participants, of the shared leaves")
