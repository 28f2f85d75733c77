"""The federated engine: vmap = sharded = loop, aggregation, role isolation, schedules, methods."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.federated.aggregate import aggregate
from comigs_jax.federated.methods import METHODS, get_method
from comigs_jax.federated.roles import role_of
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.sharding import single_device_mesh, users_mesh
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.train.state import TrainConfig
from tiny import TOL64, assert_mean_close, markov_users, random_like, tiny_base, tiny_cfg

TC = TrainConfig(rounds=2, local_steps=3, batch_size=4, seq_len=8, router_every=2, router_steps=2)


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _data(n_users, seed=0):
    return markov_users(n_users, 400, seed), markov_users(n_users, 200, seed + 100)


def _run(sim, rounds):
    metrics = []
    for _ in range(rounds):
        metrics.append(sim.run_round())
        sim.aggregate()
    return metrics


def test_vmap_sharded_and_loop_agree(x64):
    """12 users (padded to 16 on 8 devices), heterogeneous experts, router phases in both rounds,
    in float64 (tests/tiny.py TOL64). Faithful mode: the gradient leaks (method.md §8) are the most
    state the modes must carry alike; the clean mode's loop == vmap == sharded is test_bench's
    (every mode through experiments.bench)."""
    assert jax.device_count() == 8
    cfg = tiny_cfg(n_experts=3, dtype="float64")
    base = tiny_base(cfg)
    train, valid = _data(12)
    counts = [2, 3, 1, 3] * 3
    tc = dataclasses.replace(TC, faithful=True)
    method = get_method("comigs")
    results = {}
    for mode, mesh in (("vmap", single_device_mesh()), ("vmap_sharded", users_mesh()), ("loop", single_device_mesh())):
        sim = Simulation(cfg, tc, method, base, train, valid, expert_counts=counts, seed=3,
                         mode="loop" if mode == "loop" else "vmap", layout=Layout(12, mesh))
        metrics = _run(sim, 2)
        results[mode] = (_flat(jax.tree.map(lambda x: np.asarray(x)[:12], sim.states.params)), metrics, sim)
    assert results["vmap_sharded"][2].n_padded == 16
    leaf = next(iter(jax.tree.leaves(results["vmap_sharded"][2].states.params)))
    assert len(leaf.sharding.device_set) == 8 and leaf.addressable_shards[0].data.shape[0] == 2
    ref_p, ref_m, _ = results["loop"]
    assert np.any(ref_m[1]["router_phase"])  # a router phase happened
    for mode in ("vmap", "vmap_sharded"):
        p, m, _ = results[mode]
        for k in ref_p:
            np.testing.assert_allclose(p[k], ref_p[k], **TOL64, err_msg=f"{mode} {k}")
        for r in range(2):
            np.testing.assert_allclose(m[r]["loss"], ref_m[r]["loss"], **TOL64)
            np.testing.assert_array_equal(m[r]["router_phase"], ref_m[r]["router_phase"])


def test_aggregate_matches_numpy_masked_weighted_mean():
    rng = np.random.default_rng(0)
    params = {"h_0": {"attn": {"c_attn": {"lora_A": rng.normal(size=(5, 4, 2))}},
                      "mlp": {"generalists": {"fc_A": rng.normal(size=(5, 1, 4, 2))},
                              "specialists": {"fc_A": rng.normal(size=(5, 3, 4, 2))}},
                      "router": {"kernel": rng.normal(size=(5, 4, 4))}}}
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    w = np.array([0.5, 0.0, 2.0, 1.0, 0.0])
    out = _flat(aggregate(jax.tree.map(jnp.asarray, params), jnp.asarray(w), ("attn", "generalist", "specialist"),
                          n_shared_specialists=2))
    flat = _flat(params)
    for path, x in flat.items():
        role = role_of(path)
        if role == "router":
            np.testing.assert_array_equal(out[path], x)
        elif role == "specialist":
            assert_mean_close(out[path][:, :2], x[:, :2], w, err_msg=str(path))
            np.testing.assert_array_equal(out[path][:, 2:], x[:, 2:])  # slot not held by every user
        else:
            assert_mean_close(out[path], x, w, err_msg=str(path))


def test_other_users_data_never_reaches_local_leaves():
    cfg = tiny_cfg()
    base = tiny_base(cfg)
    train, valid = _data(4)
    method = get_method("comigs")
    tc = dataclasses.replace(TC, rounds=1, local_steps=4, router_every=2)
    runs = []
    for perturb in (False, True):
        tr = [t.copy() for t in train]
        va = [v.copy() for v in valid]
        if perturb:
            tr[0], va[0] = (tr[0] + 7) % 32, (va[0] + 5) % 32
        sim = Simulation(cfg, tc, method, base, tr, va, seed=0)
        _run(sim, 1)
        runs.append(_flat(sim.states.params))
    changed_shared = False
    for path in runs[0]:
        a, b = runs[0][path], runs[1][path]
        if role_of(path) in ("specialist", "router"):
            np.testing.assert_array_equal(a[1:], b[1:], err_msg=str(path))
            assert not np.array_equal(a[0], b[0])
        else:
            changed_shared |= not np.allclose(a[1:], b[1:])
    assert changed_shared  # the generalists did carry user 0's data to the others


def test_expert_and_router_steps_touch_only_their_leaves(x64):
    cfg = tiny_cfg(dtype="float64")
    base = tiny_base(cfg)
    train, valid = _data(2)
    tc = dataclasses.replace(TC, rounds=3, local_steps=2, router_every=4)
    sim = Simulation(cfg, tc, get_method("comigs"), base, train, valid, seed=0)
    p0 = _flat(sim.states.params)
    m = sim.run_round()  # steps 1-2: expert steps only, router untouched
    p1 = _flat(sim.states.params)
    assert not np.any(m["router_phase"])
    for k in p0:
        same = np.array_equal(p0[k], p1[k])
        assert same == (role_of(k) == "router"), k
    sim.run_round()  # steps 3-4, router phase after step 4
    p2 = _flat(sim.states.params)
    # Isolate the router phase: rerun steps 3-4 without it and compare expert leaves.
    sim_nr = Simulation(cfg, dataclasses.replace(tc, router_steps=0), get_method("comigs"), base, train, valid, seed=0)
    sim_nr.run_round(); sim_nr.run_round()
    q2 = _flat(sim_nr.states.params)
    for k in p2:
        if role_of(k) == "router":
            assert not np.array_equal(p2[k], p1[k])
        else:  # two programs, compiled apart, in float64 (tests/tiny.py TOL64); a router-phase update
            # of an expert leaf would move it by ~lr = 2e-3, AdamW's weight decay alone by
            # lr * wd * |x| ~ 4e-6 on the A factors
            np.testing.assert_allclose(p2[k], q2[k], **TOL64, err_msg=str(k))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_records_do_what_they_claim(name, x64):
    """In float64: the same programs as test_chunks's all-at-once runs (one compile for both)."""
    method = get_method(name)
    cfg = tiny_cfg(dtype="float64")
    base = tiny_base(cfg)
    train, valid = _data(3)
    tc = dataclasses.replace(TC, rounds=2, local_steps=2, router_every=2, router_steps=1)
    sim = Simulation(cfg, tc, method, base, train, valid, seed=1)
    assert (sim.n_rounds, sim.steps_per_round) == (2, 2)
    n = sim.n_padded  # 1 model for Centralized, else 3 users
    init = _flat(sim.states.params)
    has_router = any(role_of(k) == "router" for k in init)
    assert has_router == (method.router_mode != "none")
    for k, v in init.items():  # round 0: shared leaves identical, local ones per user
        if method.is_shared(k) or method.is_frozen(k):
            assert all(np.array_equal(v[0], v[u]) for u in range(n)), k
        elif not k[-1].endswith("B") and n > 1:  # B starts at 0 everywhere
            assert not np.array_equal(v[0], v[1]), k
    sim.run_round()
    trained = _flat(sim.states.params)
    sim.aggregate()
    after = _flat(sim.states.params)
    for k in after:
        if method.is_shared(k) and not method.one_round:
            assert all(np.allclose(after[k][0], after[k][u]) for u in range(n)), k
        elif sim.last_mixing is not None:  # PCL after a mixing round: W @ trained (tests/test_pcl.py)
            w = np.asarray(sim.last_mixing["weights"][0])
            for i in range(3):
                assert_mean_close(after[k][i], trained[k][:3], w[i], err_msg=str(k))
        else:
            np.testing.assert_array_equal(after[k], trained[k])
            if n > 1 and not np.array_equal(init[k], trained[k]):
                assert not np.allclose(trained[k][0], trained[k][1]), k
        if role_of(k) == "router":  # joint: trained every step; alternating: phase after step 2
            assert not np.array_equal(init[k], trained[k])
    if method.pooled_data:
        assert sim.n_padded == 1 and sim.tc.batch_size == 3 * TC.batch_size


def test_participation_mask_freezes_sitting_out_users():
    cfg = tiny_cfg()
    base = tiny_base(cfg)
    train, valid = _data(4)
    sim = Simulation(cfg, TC, get_method("comigs"), base, train, valid, seed=2, participation=0.5)
    p0 = _flat(sim.states.params)
    sim.run_round()
    p1 = _flat(sim.states.params)
    out = ~sim.active[:4]
    assert out.sum() == 2
    spec = next(k for k in p0 if role_of(k) == "specialist" and k[-1] == "fc_B")
    np.testing.assert_array_equal(p1[spec][out], p0[spec][out])
    assert not np.array_equal(p1[spec][~out], p0[spec][~out])
    np.testing.assert_array_equal(np.asarray(sim.states.step)[:4], np.where(out, 0, TC.local_steps))
    sim.aggregate()  # the mean is over the 2 participants, and everyone receives it
    gen = next(k for k in p0 if role_of(k) == "generalist" and k[-1] == "fc_B")
    p2 = _flat(sim.states.params)
    assert_mean_close(p2[gen][0], p1[gen][~out], np.ones(int((~out).sum())), err_msg="generalist")
    assert all(np.array_equal(p2[gen][0], p2[gen][u]) for u in range(4))


def test_training_lowers_every_users_validation_loss():
    cfg = tiny_cfg(n_layer=2)
    base = tiny_base(cfg)
    train, valid = markov_users(4, 3000, 5), markov_users(4, 600, 5)  # same chains: valid ~ train
    tc = TrainConfig(rounds=6, local_steps=10, batch_size=8, seq_len=16, lr=1e-2, router_every=10, router_steps=2)
    sim = Simulation(cfg, tc, get_method("comigs"), base, train, valid, seed=0)
    before = sim.evaluate(valid, 16, 8)["ce"]
    _run(sim, tc.rounds)
    after = sim.evaluate(valid, 16, 8)["ce"]
    assert np.all(after < before - 0.2), (before, after)


def _close(a, b, rtol=1e-5):
    """a == b to rtol of b's largest magnitude: the same gradient from two compiled programs (the
    step and a plain jax.grad) differs in float32 rounding, which is absolute, not per element."""
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def test_faithful_mode_reproduces_the_reference_gradient_leaks():
    """D2: an expert step banks its router gradient; D1: a router step banks its LoRA gradient,
    and each bank is added to the other optimizer's next step (method.md §8)."""
    from comigs_jax.federated.roles import EXPERT_ROLES, filter_roles
    from comigs_jax.train.state import init_user_state, init_trainable
    from comigs_jax.train.steps import expert_step as expert_step_, lm_loss, router_step as router_step_, sample_windows

    cfg = tiny_cfg()
    base = tiny_base(cfg)
    train, valid = _data(1)
    data = {"train": jnp.asarray(train[0]), "train_len": jnp.int32(len(train[0])),
            "valid": jnp.asarray(valid[0]), "valid_len": jnp.int32(len(valid[0]))}
    mask = jnp.ones(2, bool)
    method = get_method("comigs")
    tc = dataclasses.replace(TC, faithful=True)
    kw = dict(base=base, data=data, mask=mask, model_cfg=cfg, tc=tc, method=method)
    params = init_trainable(cfg, jax.random.key(0))  # B != 0, so that the router has a gradient
    params = random_like(params, 0.3, seed=0)
    s0 = init_user_state(params, jax.random.PRNGKey(1), tc, method)

    @functools.partial(jax.jit, static_argnums=1)  # jitted: an op-by-op step is seconds on CPU
    def grads_on(state, split):
        _, k_batch, _ = jax.random.split(state.key, 3)
        w = sample_windows(k_batch, data[split], data[f"{split}_len"], tc.batch_size, tc.seq_len)
        return jax.grad(lambda p: lm_loss(p, base, w, mask, cfg, tc.lb_weight)[0])(state.params)

    expert_step = jax.jit(functools.partial(expert_step_, **kw))
    router_step = jax.jit(functools.partial(router_step_, **kw))
    s1, _ = expert_step(s0)
    g = grads_on(s0, "train")
    for a, b in zip(jax.tree.leaves(s1.leak["router"]), jax.tree.leaves(filter_roles(g, ("router",)))):
        _close(a, b)
    s2, _ = router_step(s1)
    g = grads_on(s1, "valid")
    for a, b in zip(jax.tree.leaves(s2.leak["expert"]), jax.tree.leaves(filter_roles(g, EXPERT_ROLES))):
        _close(a, b)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(s2.leak["router"]))
    # What reaches the optimizers is gradient + bank: Adam's first moment records it exactly.
    import optax
    mu = lambda opt: optax.tree_utils.tree_get(opt, "mu")
    g_router = filter_roles(grads_on(s1, "valid"), ("router",))
    fed = jax.tree.map(jnp.add, g_router, s1.leak["router"])
    for a, b in zip(jax.tree.leaves(mu(s2.opt_router)), jax.tree.leaves(fed)):
        _close(a, (1 - tc.b1) * b)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(s1.leak["router"])) > 1e-4
    s3, _ = expert_step(s2)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(s3.leak["expert"]))
    g_exp = filter_roles(grads_on(s2, "train"), EXPERT_ROLES)
    fed = jax.tree.map(jnp.add, g_exp, s2.leak["expert"])
    expect = jax.tree.map(lambda m, g: tc.b1 * m + (1 - tc.b1) * g, mu(s2.opt_expert), fed)
    for a, b in zip(jax.tree.leaves(mu(s3.opt_expert)), jax.tree.leaves(expect)):
        _close(a, b, 1e-4)
