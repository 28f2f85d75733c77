"""Users in chunks (train.user_chunk): the same per-user results as all users at once."""
import dataclasses

import jax
import numpy as np
import pytest

from comigs_jax.federated.layout import Layout
from comigs_jax.federated.methods import METHODS, get_method
from comigs_jax.federated.sharding import single_device_mesh, users_mesh
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.train.state import TrainConfig
from tiny import TOL64, markov_users, tiny_base, tiny_cfg

TC = TrainConfig(rounds=2, local_steps=2, batch_size=4, seq_len=8, router_every=2, router_steps=1)


def test_layout_pads_each_device_to_whole_chunks():
    one, eight = single_device_mesh(), users_mesh()
    lay = Layout(5, one, chunk=2)  # 5 users, chunks of 2: one padding row
    assert (lay.model_chunk, lay.n_rows, lay.n_padding, lay.user_chunk, lay.n_user_rows) == (2, 6, 1, 2, 6)
    assert list(lay.real) == [True] * 5 + [False]
    lay = Layout(20, eight, chunk=2)  # 3 users per device -> 2 chunks of 2 per device
    assert (lay.model_chunk, lay.n_rows) == (2, 32)
    assert len(lay.rows_of_devices()[str(jax.devices()[0])]) == 4
    lay = Layout(12, eight, chunk=2)  # 2 users per device: one chunk, i.e. all at once
    assert (lay.model_chunk, lay.n_rows) == (0, 16)
    assert (Layout(12, one, chunk=0).model_chunk, Layout(12, one, chunk=0).n_rows) == (0, 12)
    pooled = Layout(6, one, pooled=True, chunk=4)  # Centralized's one model is never chunked
    assert (pooled.model_chunk, pooled.n_rows, pooled.user_chunk, pooled.n_user_rows) == (0, 1, 4, 8)
    with pytest.raises(ValueError, match=r"user_chunk=-1: must be an integer >= 0"):
        Layout(4, one, chunk=-1)


def _train(method, layout, tc=TC, participation=1.0, counts=None, evaluate=True):
    cfg = tiny_cfg(n_experts=3, dtype="float64")
    n = layout.n_users
    train, valid = markov_users(n, 300, 0), markov_users(n, 200, 100)
    sim = Simulation(cfg, tc, method, tiny_base(cfg), train, valid, layout=layout, seed=3,
                     participation=participation, expert_counts=counts)
    losses = []
    for _ in range(tc.rounds):
        losses.append(sim.run_round())
        sim.aggregate()
    params = jax.tree.map(lambda x: np.asarray(x)[: layout.n_models], sim.states.params)
    ev = sim.evaluate(valid, 8, 4, protocol="full") if evaluate else {}
    return losses, params, ev, sim


def _assert_same(a, b):
    """Metrics, parameters and evaluations of two float64 programs agree to TOL64 (tests/tiny.py)."""
    (la, pa, ea, _), (lb, pb, eb, _) = a, b
    assert jax.tree.leaves(pa)[0].dtype == np.float64
    for ra, rb in zip(la, lb):
        for k in ra:
            np.testing.assert_allclose(rb[k], ra[k], **TOL64, err_msg=k)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(pa)[0], jax.tree.leaves(pb)):
        np.testing.assert_allclose(y, x, **TOL64, err_msg=jax.tree_util.keystr(path))
    for k in ("ce", "lb", "router_prob", "selection"):
        if k in ea:
            np.testing.assert_allclose(eb[k], ea[k], **TOL64, err_msg=k)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_chunked_round_equals_all_at_once_for_every_method(name, x64):
    """3 users on one device in chunks of 2 (one padding row) = the 3 users at once: two rounds
    with router phases, then aggregation, in float64. The all-at-once run is test_engine's method
    test (same model, dtype, schedule and shapes), so the suite's compilation cache already holds
    its programs."""
    method, one = get_method(name), single_device_mesh()
    cfg = tiny_cfg(dtype="float64")
    train, valid = markov_users(3, 400, 0), markov_users(3, 200, 100)
    tc = dataclasses.replace(TC, rounds=2, local_steps=2, router_every=2, router_steps=1)
    runs = []
    for chunk in (0, 2):
        sim = Simulation(cfg, tc, method, tiny_base(cfg), train, valid, seed=1,
                         layout=Layout(3, one, pooled=method.pooled_data, chunk=chunk))
        losses = []
        for _ in range(tc.rounds):
            losses.append(sim.run_round())
            sim.aggregate()
        runs.append((losses, jax.tree.map(lambda x: np.asarray(x)[: sim.layout.n_models], sim.states.params), {}, sim))
    if not method.pooled_data:
        assert runs[1][3].n_padded == 4 and runs[1][3].layout.model_chunk == 2
    assert np.any(runs[0][0][-1].get("router_phase", [True]))
    _assert_same(*runs)


def test_chunked_sharded_round_with_padding_and_partial_participation(x64):
    """20 users on 8 devices (3 each, padded to 4 = 2 chunks of 2), heterogeneous experts, half of
    the users training each round, faithful leaks: the same as one device, all at once."""
    method = get_method("comigs")
    tc = dataclasses.replace(TC, faithful=True)
    counts = [2, 3, 1, 3] * 5
    whole = _train(method, Layout(20, single_device_mesh()), tc, 0.5, counts)
    chunked = _train(method, Layout(20, users_mesh(), chunk=2), tc, 0.5, counts)
    sim = chunked[3]
    assert sim.n_padded == 32 and sim.layout.model_chunk == 2
    leaf = jax.tree.leaves(sim.states.params)[0]
    assert len(leaf.sharding.device_set) == 8 and leaf.addressable_shards[0].data.shape[0] == 4
    np.testing.assert_array_equal(sim.active[:20], whole[3].active)
    _assert_same(whole, chunked)
