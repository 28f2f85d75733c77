"""One process of the multi-host engine test (run by tests/test_multihost.py through
experiments.launch_local, or alone with 8 fake devices as the single-process reference).

Builds 12 tiny users (padded to 16 on 8 devices), hands the Simulation ONLY the users whose
shards live on this process's devices, runs 2 rounds of CoMiGS with aggregation, and writes
(process 0) the gathered per-user losses and final parameters, and (every process) which
users and array shapes it held. Evaluation (full and reference protocols) is gathered too.
A second argument sets train.user_chunk (the 2-process run uses 1: each device's 2 users one
at a time, compared with the reference's all at once).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from types import SimpleNamespace  # noqa: E402

import jax  # noqa: E402

from comigs_jax import distributed  # noqa: E402

# The same start-up as experiments.run: initialise when launched as one of several processes.
distributed.initialize(SimpleNamespace(mode="auto", coordinator_address="", num_processes=0, process_id=-1))


import numpy as np  # noqa: E402

from comigs_jax.federated.methods import get_method  # noqa: E402
from comigs_jax.federated.layout import Layout  # noqa: E402
from comigs_jax.federated.sharding import users_mesh  # noqa: E402
from comigs_jax.experiment.simulation import Simulation  # noqa: E402
from comigs_jax.train.state import TrainConfig  # noqa: E402
from tiny import markov_users, tiny_base, tiny_cfg  # noqa: E402


def main(out_dir, chunk=0):
    """In float64: this process's programs and the reference's differ (tests/tiny.py TOL64)."""
    with jax.enable_x64(True):
        _main(out_dir, chunk)


def _main(out_dir, chunk):
    n_users = 12
    cfg = tiny_cfg(n_experts=3, dtype="float64")
    tc = TrainConfig(rounds=2, local_steps=3, batch_size=4, seq_len=8, router_every=2, router_steps=2)
    layout = Layout(n_users, users_mesh(), chunk=chunk)
    mine = layout.data_users  # this process's users: those on its devices
    train_all, valid_all = markov_users(n_users, 400, 0), markov_users(n_users, 200, 100)
    train, valid = [train_all[u] for u in mine], [valid_all[u] for u in mine]  # nothing else is given
    sim = Simulation(cfg, tc, get_method("comigs"), tiny_base(cfg), train, valid,
                     expert_counts=[2, 3, 1, 3] * 3, seed=3, layout=layout, user_indices=mine)
    losses = []
    for _ in range(2):
        losses.append(sim.run_round()["loss"])
        sim.aggregate()
    evals = {f"eval_{p}": sim.evaluate(valid, 8, 4, protocol=p, seed=5)["ce"] for p in ("full", "reference")}
    params = jax.tree.map(lambda x: distributed.to_host(x)[:n_users], sim.states.params)
    pid = jax.process_index()
    local = {k: [list(s.data.shape) for s in v.addressable_shards] for k, v in sim.data.items()}
    with open(os.path.join(out_dir, f"process{pid}.json"), "w") as f:
        json.dump({"process": pid, "devices": jax.local_device_count(), "users": mine,
                   "local_rows": sim.local_rows, "shards": local}, f)
    if pid == 0:
        flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(os.path.join(out_dir, "result.npz"), losses=np.stack(losses), **evals, **flat)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
