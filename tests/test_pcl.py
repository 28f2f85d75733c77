"""PCL (method.md §7): softmax(-ppl) collaboration weights, mixing of whole models, the (model, data)
pair evaluation as one vmapped program, and the mixing through the engine."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.experiment.simulation import Simulation
from comigs_jax.experiment import pcl_mixing
from comigs_jax.federated import pcl
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.methods import PCL, get_method
from comigs_jax.train.state import TrainConfig
from comigs_jax.train.steps import evaluate_user
from tiny import assert_mean_close, markov_users, random_like, tiny_base, tiny_cfg

TC = TrainConfig(rounds=4, local_steps=3, batch_size=4, seq_len=8)
EVERY_ROUND = dataclasses.replace(get_method("pcl"), pcl=PCL(start=0, every=1, batches=3))


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_schedule_is_the_references():
    # 77efb25: `if epoch > 3 and epoch % 2 == 0` after each 0-indexed round of 20; 2d42464: every round
    assert [r for r in range(20) if pcl.mixes_after(get_method("pcl").pcl, r)] == [4, 6, 8, 10, 12, 14, 16, 18]
    assert [r for r in range(20) if pcl.mixes_after(get_method("pcl_every_round").pcl, r)] == list(range(20))
    m = get_method("pcl")
    assert m.shared_roles == () and not m.has_router and not m.one_round  # no server, no sync, no router


def test_weights_and_mixing_match_numpy():
    rng = np.random.default_rng(0)
    ppl = rng.uniform(1.0, 6.0, (4, 4))
    w = pcl.collaboration_weights(ppl)
    ref = np.exp(-ppl) / np.exp(-ppl).sum(1, keepdims=True)  # W_ij = softmax_j(-ppl_ij), no temperature
    np.testing.assert_allclose(w, ref, rtol=1e-12)
    # two federations of 2 users and a padding row: softmax within each federation, padding keeps itself
    allowed = np.zeros((5, 5), bool)
    allowed[:2, :2] = allowed[2:4, 2:4] = True
    p5 = rng.uniform(1.0, 6.0, (5, 5))
    w5 = pcl.collaboration_weights(p5, allowed)
    for blk in (slice(0, 2), slice(2, 4)):
        e = np.exp(-p5[blk, blk])
        np.testing.assert_allclose(w5[blk, blk], e / e.sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_array_equal(w5[4], [0, 0, 0, 0, 1])
    assert w5[:2, 2:].sum() == 0 and w5[2:4, :2].sum() == 0
    params = {"a": {"A": rng.standard_normal((4, 3, 2)).astype(np.float32)},
              "b": rng.standard_normal((4, 5)).astype(np.float32)}
    mixed = pcl.mix_params(params, jax.numpy.asarray(w, jax.numpy.float32))
    for i in range(4):  # row i is the W_i-weighted mean of every user's leaf
        assert_mean_close(mixed["a"]["A"][i], params["a"]["A"], w[i], err_msg=f"a/A row {i}")
        assert_mean_close(mixed["b"][i], params["b"], w[i], err_msg=f"b row {i}")


def _sim(n_users=3, layout=None, expert_counts=None, method=EVERY_ROUND, **kw):
    cfg = tiny_cfg()
    train, valid = markov_users(n_users, 300, 0), markov_users(n_users, 120, 100)
    base = tiny_base(cfg)
    base["wte"]["embedding"] = base["wte"]["embedding"] / 10  # ppl near VOCAB: W far from one-hot
    return Simulation(cfg, TC, method, base, train, valid, seed=3, layout=layout,
                      expert_counts=expert_counts, **kw), valid


def _perturb(sim, seed=0):
    """Every user's trainable leaves replaced by small random values (the models differ)."""
    sim.states = sim.states.replace(params=jax.device_put(random_like(sim.states.params, 0.3, seed), sim.layout.users))


def test_pair_evaluation_equals_a_double_loop():
    """The vmapped (model, data) program, sharded over the devices in chunks of 1 user, =
    evaluate_user for every pair i, j separately; expert masks are the model's (E = 2, 1, 2).
    (The unsharded, unchunked program is test_round_mixes_every_trainable_leaf's.)"""
    layout = Layout.build(3, pooled=False, shard=True, mode="vmap", chunk=1)
    sim, valid = _sim(layout=layout, expert_counts=[2, 1, 2])
    _perturb(sim)
    ppl, allowed = pcl_mixing.pair_perplexities(sim, 0)
    n = 3
    assert allowed[:n, :n].all() and not allowed[n:].any() and not allowed[:, n:].any()
    starts = pcl.pair_windows([len(v) for v in valid], TC.seq_len, 3 * TC.batch_size, [3] * n, 0, range(n))
    one = jax.jit(lambda p, t, s, m: evaluate_user(p, sim.base, t, s, np.ones(s.shape, np.float32), m,
                                                   model_cfg=sim.model_cfg, seq_len=TC.seq_len, batch=TC.batch_size))
    for i in range(n):
        for j in range(n):
            out = one(sim.user_params(j), valid[i], starts[i], sim.masks[j])
            ce = np.asarray(out["ce_sum"], np.float64).sum() / (np.asarray(out["weight"]).sum() * TC.seq_len)
            np.testing.assert_allclose(ppl[i, j], np.exp(ce), rtol=2e-5, err_msg=f"model {j} on user {i}")
    assert len({round(x, 4) for x in ppl[:n, :n].ravel()}) > 3  # the pairs differ


def test_round_mixes_every_trainable_leaf():
    """Through the engine: no round-0 sync (different inits), W @ params after a mixing round, the
    parameters untouched after a round that does not mix, the optimizer states untouched."""
    method = dataclasses.replace(EVERY_ROUND, pcl=PCL(start=1, every=1, batches=3))
    sim, _ = _sim(method=method)
    init = _flat(sim.states.params)
    assert all(not np.array_equal(x[0], x[1]) for k, x in init.items() if k[-1] == "A")  # own initialisations
    _perturb(sim, seed=1)  # as trained (B leaves 0); the engine's own rounds: the experiment.run test
    sim.round_index = 1  # after round 0: no mixing (start=1)
    before = _flat(sim.states.params)
    sim.aggregate()
    assert sim.last_mixing is None
    for k, x in _flat(sim.states.params).items():
        np.testing.assert_array_equal(x, before[k])
    _perturb(sim, seed=2)
    sim.round_index = 2
    before, opt_before = _flat(sim.states.params), jax.tree.map(np.asarray, sim.states.opt_expert)
    sim.aggregate()
    mixing = sim.last_mixing
    assert mixing["round"] == 2
    w, ppl = np.asarray(mixing["weights"][0]), np.asarray(mixing["ppl"][0])
    e = np.exp(-(ppl - ppl.min(1, keepdims=True)))  # softmax_j(-ppl_ij), stably
    np.testing.assert_allclose(w, e / e.sum(1, keepdims=True), rtol=1e-6, atol=1e-12)
    assert w.max() < 0.99  # a real mix, not a copy of one model
    after = _flat(sim.states.params)
    for k, x in before.items():
        for i in range(3):
            assert_mean_close(after[k][i], x[:3], w[i], err_msg="/".join(k))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sim.states.opt_expert), opt_before)


def test_partial_participation_is_refused():
    with pytest.raises(ValueError, match="PCL.*participation=1"):
        _sim(participation=0.5)


def test_config_refuses_partial_participation_before_compile():
    from comigs_jax import configuration
    from comigs_jax.errors import ConfigError
    from configs import tiny
    c = tiny.get_config("pcl")
    c.federation.participation = 0.5
    with pytest.raises(ConfigError, match=r"^config.federation.participation=0.5 is not allowed: 1 for method pcl"):
        configuration.validate(c)


def test_experiment_run_mixes_and_logs_the_weights(tmp_path):
    """configs/tiny.py (2 rounds) with PCL mixing after every round (2d42464): every round's record
    holds the 3 x 3 validation perplexities and the softmax(-ppl) weights; the run finishes, its
    post-aggregation evaluation (after the last mixing) differing from the pre-aggregation one."""
    import json
    from comigs_jax import experiment
    from configs import tiny
    c = tiny.get_config("pcl_every_round")
    c.output.figures = False
    c.train.rounds, c.pretrain.steps = 2, 5
    res = experiment.run(c, str(tmp_path))[("pcl_every_round", c.seed)]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["pcl"]["round"] for r in records] == [1, 2]
    for r in records:
        ppl, w = np.asarray(r["pcl"]["ppl"]), np.asarray(r["pcl"]["weights"])
        assert ppl.shape == w.shape == (3, 3) and np.isfinite(ppl).all()
        e = np.exp(-(ppl - ppl.min(1, keepdims=True)))
        np.testing.assert_allclose(w, e / e.sum(1, keepdims=True), rtol=1e-6, atol=1e-12)
    pre = [u["test_ppl"] for u in res["users"]]
    post = [u["test_ppl_post_aggregation"] for u in res["users"]]
    assert np.isfinite(pre).all() and np.isfinite(post).all() and pre != post
    assert res["pcl"] == {"start": 0, "every": 1, "batches": 20} and res["shared_roles"] == []
    assert res["communication"]["upload_rounds"] == [2, 2, 2]


def test_communication_counts_whole_models_per_mixing_round():
    from comigs_jax.federated.communication import accounting
    from comigs_jax.federated.methods import configure_model
    from comigs_jax.model.lm import param_shapes
    cfg = configure_model(tiny_cfg(), get_method("pcl"))
    n = sum(int(np.prod(s.shape)) for k, s in traverse_util.flatten_dict(param_shapes(cfg)).items()
            if "lora_A" in k or "lora_B" in k or "generalists" in k or "specialists" in k)
    out = accounting(cfg, get_method("pcl"), [2] * 4, 20, [20] * 4)
    assert out["per_round_params"] == [n] * 4 and out["upload_rounds"] == [8] * 4  # rounds 4, 6, ..., 18
    assert out["download_bytes_float32"] == [n * 8 * 3 * 4] * 4 and out["upload_bytes_float32"] == [n * 8 * 4] * 4


def test_stacked_federations_mix_within_their_own():
    """Two federations (seeds) on one user axis: each federation's W is the softmax over its own
    users only, and its models mix with its own (the other federation's weights are 0)."""
    cfg = tiny_cfg()
    train, valid = markov_users(3, 300, 0), markov_users(3, 120, 100)
    base = tiny_base(cfg)
    base["wte"]["embedding"] = base["wte"]["embedding"] / 10
    sim = Simulation(cfg, TC, EVERY_ROUND, base, train, valid, federations=[{"seed": 3}, {"seed": 4}])
    _perturb(sim, seed=5)
    sim.round_index = 1
    before = _flat(sim.states.params)
    sim.aggregate()
    mixing = sim.last_mixing
    after = _flat(sim.states.params)
    for f in range(2):
        w, ppl = np.asarray(mixing["weights"][f]), np.asarray(mixing["ppl"][f])
        e = np.exp(-(ppl - ppl.min(1, keepdims=True)))
        np.testing.assert_allclose(w, e / e.sum(1, keepdims=True), rtol=1e-6, atol=1e-12)
        rows = slice(3 * f, 3 * f + 3)
        for k, x in before.items():
            for i in range(3):
                assert_mean_close(after[k][rows][i], x[rows], w[i], err_msg=f"federation {f} {'/'.join(k)}")
