"""What a Simulation gives its server after a round (comigs_jax.federated.server.Server.inputs):
each kind reads the Simulation, writes nothing, and returns (inputs, report) where report is the
round's record of the server (PCL's perplexities and weights) or None."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from comigs_jax.experiment import pcl_mixing
from comigs_jax.federated.aggregate import aggregation_weights
from comigs_jax.federated.privacy import noise_keys
from comigs_jax.federated.server import Uploads


def uploads(sim, round_index: int):
    """Uploads: per-row weights over the real rows that trained and uploaded (x training tokens with
    weighting="tokens"), their training tokens, each row's federation; the shared leaves at the
    round's start for a server that needs them; with DP each federation's noise key of the round."""
    real, active = jax.device_put((jnp.asarray(sim.real), jnp.asarray(sim.active)), sim.layout.users)
    n_tok = aggregation_weights(real, active, sim.data["train_len"])
    w = n_tok if sim.weighting == "tokens" else aggregation_weights(real, active)
    start = sim.round_start if sim.server.needs_start else None
    keys = jax.device_put(noise_keys(sim.seeds, round_index), sim.layout.replicated) if sim.setup.dp else None
    return Uploads(w, n_tok, sim.groups_dev, start, keys), None


INPUTS = {"uploads": uploads, "mixing": pcl_mixing.mixing_inputs}
