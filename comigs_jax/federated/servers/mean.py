"""The mean: every shared leaf replaced by the weighted mean over the rows that uploaded, within
each federation (comigs_jax.federated.aggregate)."""
from __future__ import annotations

from comigs_jax.federated.aggregate import aggregate
from comigs_jax.federated.server import Server, Setup, Uploads


def mean_of_shared(setup: Setup, params: dict, up: Uploads) -> dict:
    m = setup.method
    return aggregate(params, up.weights, m.shared_roles, setup.n_shared_specialists, m.shared_factors, m.frozen,
                     groups=up.groups, n_groups=setup.n_groups)


def apply(setup: Setup, params: dict, up: Uploads, state: dict):
    return mean_of_shared(setup, params, up), state


SERVER = Server("mean", apply, description="the weighted mean of the shared leaves over the users that uploaded")
