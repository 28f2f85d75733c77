"""No server: methods synchronised at round 0 only (`Method.one_round`: Local, Centralized,
CoMiGS-2S, ...). Nothing is exchanged after a round."""
from __future__ import annotations

from comigs_jax.federated.server import Server, never


def apply(setup, params, inputs, state):
    return params, state


SERVER = Server("none", apply, after_round=never, description="one round: shared leaves synchronised at round 0 only")
