"""Synthetic users: exact Bayes-optimal perplexity, speed, determinism, subset independence."""
import itertools

import numpy as np
import pytest

from comigs_jax.data import default_data_config, general_stream, load_user_data
from comigs_jax.data import synthetic as S


def _cfg(**kw):
    c = default_data_config()
    c.source = "synthetic"
    c.synthetic.vocab_size = 256
    c.train_tokens, c.valid_tokens, c.test_tokens = 200_000, 20_000, 20_000
    for k, v in kw.items():
        c[k] = v
    return c


def _brute_logprobs(x, P0, P1, T, pi):
    """log p(x_t | x_<t) by summing over every hidden path z_0..z_t."""
    L = []
    for t in range(len(x)):
        tot = 0.0
        for z in itertools.product([0, 1], repeat=t + 1):
            p = pi[z[0]]
            for j in range(1, t + 1):
                p *= T[z[j - 1], z[j]] * (P0 if z[j] == 0 else P1)[x[j - 1], x[j]]
            tot += p
        L.append(tot)
    return np.diff(np.log(L))


@pytest.mark.parametrize("rate, knows", [(0.1, 1.0), (1.0, 1.0), (0.1, 0.5), (0.1, 0.0)])
def test_bayes_matches_brute_force_tiny(rate, knows):
    c = _cfg()
    c.n_users = 2
    s = c.synthetic
    s.vocab_size, s.general_branching, s.specific_branching, s.switch_rate = 3, 3, 2, rate
    s.base_knows_shared = knows
    proc = S.user_process(c, 1)
    P0, P1 = proc.general.dense(), proc.specific.dense()
    np.testing.assert_allclose(P0.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(P1.sum(1), 1.0, atol=1e-12)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(6):  # sampled sequences and arbitrary ones
        x = S.sample_streams([proc], 5, [[int(rng.integers(1 << 30))]])[0]
        for seq in (x, rng.integers(0, 3, 5)):
            if np.any(np.maximum(P0, P1)[seq[:-1], seq[1:]] == 0):
                continue
            fwd = S.bayes_logprobs(seq, P0, P1, proc.transition, proc.stationary)
            ref = _brute_logprobs(seq, P0, P1, proc.transition, proc.stationary)
            worst = max(worst, np.abs(fwd - ref).max())
    assert worst < 1e-12


@pytest.mark.parametrize("knows", [1.0, 0.3])
def test_bayes_long_stream_matches_sequential_filter(knows):
    c = _cfg()
    c.synthetic.base_knows_shared = knows
    proc = S.user_process(c, 2)
    x = S.sample_streams([proc], 3000, [[1, 2, 3]])[0]
    P0, P1, T, pi = proc.general.dense(), proc.specific.dense(), proc.transition, proc.stationary
    f, ref = pi.copy(), []
    for t in range(1, len(x)):  # normalised forward filter, one step at a time
        pred = f @ T
        e = np.array([P0[x[t - 1], x[t]], P1[x[t - 1], x[t]]])
        p = pred @ e
        ref.append(np.log(p))
        f = pred * e / p
    np.testing.assert_allclose(S.bayes_logprobs(x, P0, P1, T, pi), ref, rtol=0, atol=1e-9)


def test_generation_matches_the_process():
    c = _cfg()
    d = load_user_data(c)
    assert [len(a) for a in d.train] == [200_000] * 4 and [len(a) for a in d.test] == [20_000] * 4
    assert d.train[0].dtype == np.uint16 and d.vocab_size == 256 and d.eos_id is None
    assert d.users == ["user0", "user1", "user2", "user3"]
    b = d.info["bayes_ppl_test"]
    assert len(b) == 4 and all(1.0 < v < 256 for v in b)
    # every transition seen has positive probability under the user's process
    for u in range(4):
        proc = S.user_process(c, u)
        P = np.maximum(proc.general.dense(), proc.specific.dense())
        x = d.train[u].astype(np.int64)
        assert np.all(P[x[:-1], x[1:]] > 0)
    # empirical hidden-state share matches the configured one
    z = S.sample_hidden(400_000, 0.03, 0.07, 0.3, np.random.default_rng(0))
    assert abs(z.mean() - 0.3) < 0.02 and abs(np.mean(z[1:] != z[:-1]) - 2 * 0.3 * 0.7 * 0.1) < 0.004


def test_trained_models_stay_above_the_bayes_floor():
    """Count-based models fitted on train (bigram, and the true chains without the hidden state)."""
    c = _cfg()
    d = load_user_data(c)
    V = c.synthetic.vocab_size
    for u in range(4):
        tr, te = d.train[u].astype(np.int64), d.test[u].astype(np.int64)
        C = np.full((V, V), 0.01)
        np.add.at(C, (tr[:-1], tr[1:]), 1.0)
        C /= C.sum(1, keepdims=True)
        bigram = np.exp(-np.log(C[te[:-1], te[1:]]).mean())
        proc = S.user_process(c, u)
        mix = (1 - proc.share) * proc.general.dense() + proc.share * proc.specific.dense()
        memoryless = np.exp(-np.log(mix[te[:-1], te[1:]]).mean())
        bayes = d.info["bayes_ppl_test"][u]
        assert bayes < bigram and bayes < memoryless, (u, bayes, memoryless, bigram)
    # users are heterogeneous: a larger specific share (sparser chain) gives a lower floor
    assert d.info["bayes_ppl_test"][0] > d.info["bayes_ppl_test"][3]


def test_deterministic_and_independent_of_requested_users():
    c = _cfg()
    c.train_tokens = 5000
    all_users = load_user_data(c)
    again = load_user_data(c)
    sub = load_user_data(c, user_indices=[2, 0])
    assert sub.users == ["user2", "user0"] and sub.indices == [2, 0]
    for split in ("train", "valid", "test"):
        for u in range(4):
            np.testing.assert_array_equal(all_users.split(split)[u], again.split(split)[u])
        np.testing.assert_array_equal(sub.split(split)[0], all_users.split(split)[2])
        np.testing.assert_array_equal(sub.split(split)[1], all_users.split(split)[0])
    assert sub.info["bayes_ppl_test"] == [all_users.info["bayes_ppl_test"][i] for i in (2, 0)]
    # splits and users are different streams
    assert not np.array_equal(all_users.train[0][:1000], all_users.train[1][:1000])
    c2 = _cfg()
    c2.train_tokens = 5000
    c2.seed = 1
    assert not np.array_equal(load_user_data(c2).train[0], all_users.train[0])


def test_general_stream():
    c = _cfg()
    g = general_stream(c, 50_000, seed=0)
    assert g.shape == (50_000,) and g.dtype == np.uint16
    np.testing.assert_array_equal(g, general_stream(c, 50_000, seed=0))
    assert not np.array_equal(g, general_stream(c, 50_000, seed=1))
    G = S.general_chain(c).dense()
    x = g.astype(np.int64)
    assert np.all(G[x[:-1], x[1:]] > 0)  # only general transitions
    # its empirical cross-entropy under G is the chain's entropy rate
    ce = -np.log(G[x[:-1], x[1:]]).mean()
    assert abs(ce - S.general_entropy_rate(c)) < 0.05


def test_too_short_split_names_the_user():
    c = _cfg()
    c.min_tokens = 129
    c.test_tokens = 100
    with pytest.raises(ValueError, match=r"test_tokens=100.*min_tokens=129"):
        load_user_data(c)


def test_small_gpt2_trained_on_it_stays_above_the_floor():
    import jax
    import jax.numpy as jnp
    import optax

    from comigs_jax.model.config import GPT2Config
    from comigs_jax.model.gpt2 import GPT2, init_params

    c = _cfg()
    c.n_users = 2
    c.synthetic.vocab_size = 64
    c.train_tokens, c.valid_tokens, c.test_tokens = 60_000, 2000, 20_000
    d = load_user_data(c, user_indices=[1])
    mcfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=64, n_layer=1, n_head=2)
    model = GPT2(mcfg)
    params = init_params(mcfg, jax.random.key(0))
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    T, B = 32, 16

    def loss_fn(p, x):
        logits, _ = model.apply({"params": p}, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def step(p, o, x):
        l, g = jax.value_and_grad(loss_fn)(p, x)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    train = jnp.asarray(d.train[0].astype(np.int32))
    rng = np.random.default_rng(0)
    for _ in range(100):
        starts = rng.integers(0, len(train) - T - 1, B)
        params, opt, _ = step(params, opt, train[starts[:, None] + np.arange(T + 1)])
    test = d.test[0].astype(np.int32)
    n = (len(test) - 1) // T
    windows = np.stack([test[i * T:i * T + T + 1] for i in range(n)])
    ce = float(jax.jit(loss_fn)(params, jnp.asarray(windows)))
    floor = d.info["bayes_ppl_test"][0]
    unigram = np.bincount(d.train[0], minlength=64) + 1.0
    uni_ppl = float(np.exp(-np.log((unigram / unigram.sum())[test[1:]]).mean()))
    print(f"bayes floor {floor:.3f}  trained GPT-2 {np.exp(ce):.3f}  unigram {uni_ppl:.3f}")
    assert floor < np.exp(ce) < uni_ppl, (floor, np.exp(ce), uni_ppl)


# sha256 of the users' train, valid and test arrays (in that order, users in order) and of a
# 5,000-token pretraining stream, made by the code before base_knows_shared existed (ca94b6e's
# synthetic.py and general_stream): base_knows_shared = 1 must reproduce them bit for bit.
BEFORE_USERS = "55257acc2a54700c726c3a8845aafe12d51fa02a37e7cd75afe884cdfaa2016a"
BEFORE_STREAM = "ea64f8e015d93f0f26b01bd8019d378dec74e09127613651ce0074996351c978"


def _small(knows):
    c = default_data_config()
    c.synthetic.vocab_size = 64
    c.train_tokens, c.valid_tokens, c.test_tokens, c.use_cache = 3000, 1000, 1000, False
    c.synthetic.base_knows_shared = knows
    return c


def _digest(d):
    import hashlib
    h = hashlib.sha256()
    for split in ("train", "valid", "test"):
        for a in d.split(split):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_base_knows_everything_is_the_old_process_bit_for_bit():
    import hashlib
    c = _small(1.0)
    assert _digest(load_user_data(c)) == BEFORE_USERS
    assert hashlib.sha256(S.base_stream(c, 5000, seed=0).tobytes()).hexdigest() == BEFORE_STREAM
    assert S.general_chain(c) is S.base_chain(c)
    c0 = _small(0.5)
    assert _digest(load_user_data(c0)) != BEFORE_USERS  # the knob reaches the users' data
    np.testing.assert_array_equal(S.base_stream(c0, 5000, seed=0), S.base_stream(c, 5000, seed=0))


def test_base_knows_a_share_of_the_shared_rows():
    V = 64
    B = S.base_chain(_small(1.0))
    known = {}
    for k in (0.0, 0.25, 0.5, 0.9, 1.0):
        c = _small(k)
        G = S.general_chain(c)
        same = np.all(G.succ == B.succ, axis=1) & np.all(G.probs == B.probs, axis=1)
        known[k] = set(np.flatnonzero(same))
        assert len(known[k]) == round(k * V), k
        assert S.base_chain(c) is B  # the base's chain does not depend on the knob
        np.testing.assert_allclose(G.dense().sum(1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(G.probs, np.diff(np.concatenate(
            [np.zeros((V, 1)), G.thresholds.astype(np.float64), np.full((V, 1), 2.0 ** 32)], axis=1), axis=1) / 2 ** 32)
    assert known[0.25] <= known[0.5] <= known[0.9] <= known[1.0]  # nested


def test_base_is_pretrained_on_its_own_chain_only():
    c = _small(0.0)
    x = S.base_stream(c, 20_000, seed=0).astype(np.int64)
    Bd, Gd = S.base_chain(c).dense(), S.general_chain(c).dense()
    assert np.all(Bd[x[:-1], x[1:]] > 0)
    assert np.mean(Gd[x[:-1], x[1:]] == 0) > 0.5  # mostly transitions the users' shared chain never makes
    d = load_user_data(c)  # the users' general segments follow G: every transition possible under G or S_u
    for u in range(4):
        P = np.maximum(Gd, S.user_process(c, u).specific.dense())
        y = d.train[u].astype(np.int64)
        assert np.all(P[y[:-1], y[1:]] > 0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, 2])
def test_base_knows_shared_out_of_range_is_one_line(bad):
    from comigs_jax.data import validate_data_config
    c = _small(1.0)
    c.synthetic.base_knows_shared = bad
    with pytest.raises(ValueError) as e:
        validate_data_config(c)
    assert str(e.value).startswith(f"data.synthetic.base_knows_shared={float(bad)!r} is not allowed: a share in [0, 1]")
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError):  # the wrong type: the config itself refuses it
        c.synthetic.base_knows_shared = "half"


def test_one_pretrained_base_for_every_base_knowledge():
    """base="pretrain" trains on the base chain alone, which the knob does not change: one cached
    base (the same folder as before the knob existed) for every value."""
    import os
    from comigs_jax import cli
    from comigs_jax.experiment.base_model import pretrained_base_dir
    cfg = cli.load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.py"))
    dirs = set()
    for k in (1.0, 0.5, 0.0):
        cfg.data.synthetic.base_knows_shared = k
        dirs.add(pretrained_base_dir(cfg))
    assert len(dirs) == 1
    cfg.data.synthetic.general_branching += 1  # the base chain itself: another base
    assert pretrained_base_dir(cfg) not in dirs


def test_target_share_shift_moves_validation_and_test_only():
    """target_share_shift d: train as before (bit for bit), valid and test from the process whose
    specific share is share + d (1 - share); their Bayes floors exact under that process (the
    sequential filter), and the empirical hidden share follows."""
    c, cs = _cfg(), _cfg()
    c.train_tokens = cs.train_tokens = 5000
    cs.synthetic.target_share_shift = 0.6
    d, ds = load_user_data(c), load_user_data(cs)
    for u in range(4):
        np.testing.assert_array_equal(ds.train[u], d.train[u])
        assert not np.array_equal(ds.test[u], d.test[u])
    shares = S.user_shares(c.synthetic, 4)
    np.testing.assert_allclose(ds.info["target_specific_share"], shares + 0.6 * (1 - shares), rtol=1e-15)
    assert "target_specific_share" not in d.info
    for u in (0, 3):
        proc = S.target_process(cs, S.user_process(cs, u))
        x = ds.test[u].astype(np.int64)
        P0, P1, T, pi = proc.general.dense(), proc.specific.dense(), proc.transition, proc.stationary
        f, ref = pi.copy(), []
        for t in range(1, len(x)):
            pred = f @ T
            e = np.array([P0[x[t - 1], x[t]], P1[x[t - 1], x[t]]])
            ref.append(np.log(pred @ e))
            f = pred * e / (pred @ e)
        assert ds.info["bayes_ppl_test"][u] == pytest.approx(np.exp(-np.mean(ref)), rel=1e-12)
    z = S.sample_hidden(400_000, *(lambda p: (p.a, p.b, p.share))(S.target_process(cs, S.user_process(cs, 0))),
                        np.random.default_rng(0))
    assert abs(z.mean() - (shares[0] + 0.6 * (1 - shares[0]))) < 0.03
    for bad in (1.0, -0.2):
        cs.synthetic.target_share_shift = bad
        with pytest.raises(ValueError, match=r"^data.synthetic.target_share_shift=.* is not allowed: a shift in \[0, 1\)"):
            load_user_data(cs)
