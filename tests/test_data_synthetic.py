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


@pytest.mark.parametrize("rate", [0.1, 1.0])
def test_bayes_matches_brute_force_tiny(rate):
    c = _cfg()
    c.n_users = 2
    s = c.synthetic
    s.vocab_size, s.general_branching, s.specific_branching, s.switch_rate = 3, 3, 2, rate
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


def test_bayes_long_stream_matches_sequential_filter():
    c = _cfg()
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
