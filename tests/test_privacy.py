"""User-level DP of the shared leaves (comigs_jax.federated.privacy, accounting; issue 30 items 3-4):
the DP server against a NumPy transcription of DP-FedAvg's estimator, clipping bounds, the noise's
std against its chi-square interval, epsilon against dp_accounting and a published value, sigma = 0
and C = inf against FedAvg bit for bit, Poisson participation's statistics, and the one-line refusals."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import traverse_util

from comigs_jax.federated import accounting, privacy
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.server import Setup, Uploads
from comigs_jax.federated.servers import SERVERS, server_for

dpa = pytest.importorskip("dp_accounting")

GROUPS = np.array([0, 0, 0, 1, 1, 1, 1])  # two federations of 3 users, one padding row (weight 0)
ATTN = ("h_0", "attn", "c_attn", "lora_A")
GEN = ("h_0", "mlp", "generalists", "fc_A")
SPEC = ("h_0", "mlp", "specialists", "fc_A")
ROUTER = ("h_0", "mlp", "router", "kernel")
F32_U = 2.0 ** -24


def _flat(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = {ATTN: (7, 5, 3), GEN: (7, 1, 5, 2), SPEC: (7, 1, 5, 2), ROUTER: (7, 5, 2)}
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _server(method, dp, flat, start, w, keys=None, name="dp_mean"):
    setup = Setup(method, n_shared_specialists=1, n_groups=2, dp=dp)
    nest = lambda f: traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in f.items()})
    shared_start = {k: v for k, v in start.items() if method.is_shared(k)}
    keys = privacy.noise_keys([0, 1], 0) if keys is None else keys
    up = Uploads(jnp.asarray(w, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(GROUPS, jnp.int32),
                 nest(shared_start), jnp.asarray(keys))
    out, _ = jax.jit(lambda p, u: SERVERS[name].apply(setup, p, u, {}))(nest(flat), up)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(out).items()}


def _np_dp_mean(method, flat, start, w, clip, expected):
    """DP-FedAvg (McMahan et al. 2018, Alg. 1, fixed denominator) without noise, in float64: per
    federation s + sum_i clip_C(x_i - s) / D over its uploading rows, the norm over every shared leaf."""
    shared = [k for k in flat if method.is_shared(k)]
    out = {k: np.asarray(v, np.float64).copy() for k, v in flat.items()}
    for g in (0, 1):
        rows = np.flatnonzero(GROUPS == g)
        s = {k: np.asarray(start[k][rows[0]], np.float64) for k in shared}
        total = {k: np.zeros_like(s[k]) for k in shared}
        for i in rows[w[rows] > 0]:
            d = {k: np.asarray(flat[k][i], np.float64) - s[k] for k in shared}
            norm = math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))
            f = min(1.0, clip / norm)
            for k in shared:
                total[k] += f * d[k]
        for k in shared:
            out[k][rows] = s[k] + total[k] / expected
    return out


@pytest.mark.parametrize("method", ["fedavg", "comigs"])
@pytest.mark.parametrize("clip", [0.5, 3.0, math.inf])
def test_dp_server_is_numpys_clipped_fixed_denominator_mean_without_noise(method, clip):
    m = get_method(method)
    start = {k: np.broadcast_to(v[[0, 0, 0, 3, 3, 3, 3]], v.shape).copy() for k, v in _flat(1).items()}
    flat = {k: start[k] + _flat(2, 0.3)[k] for k in start}  # updates of norm ~ 0.3 sqrt(40) ~ 2
    w = np.array([1, 0, 1, 1, 1, 1, 0.0])  # a user that sat out, the padding row
    dp = privacy.DP(clip=clip, noise_multiplier=0.0, q=2 / 3, n_users=3)  # D = k = 2
    got = _server(m, dp, flat, start, w)
    want = _np_dp_mean(m, flat, start, w, clip, dp.expected)
    for k in flat:
        if not m.is_shared(k):
            np.testing.assert_array_equal(got[k], flat[k], err_msg=str(k))  # local leaves: untouched
            continue
        # float32 sums of <= 3 terms of size <= |s| + |delta| ~ 4: within 1e-5 absolute; a wrong clip
        # factor, user or denominator moves the result by >= 0.01
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=str(k))
    if clip == 0.5:  # the clip binds: the result is not the plain mean
        assert not np.allclose(got[ATTN][:3], flat[ATTN][[0, 2]].mean(0), atol=1e-3)


def test_every_clipped_update_has_norm_at_most_c_and_short_ones_are_untouched():
    rng = np.random.default_rng(0)
    n_rows, clip = 64, 1.5
    scales = np.geomspace(0.01, 100, n_rows)[:, None, None]
    ups = [(scales * rng.standard_normal((n_rows, 6, 7))).astype(np.float32),
           (scales[..., 0] * rng.standard_normal((n_rows, 9))).astype(np.float32)]
    div = np.asarray(privacy.clip_divisors([jnp.asarray(u) for u in ups], clip))
    clipped = [u / div.reshape((-1,) + (1,) * (u.ndim - 1)) for u in ups]
    norms = np.sqrt(sum((c.astype(np.float64) ** 2).reshape(n_rows, -1).sum(1) for c in clipped))
    n = 6 * 7 + 9  # a float32 norm of n terms is within (n + 2) u relative (Higham); twice: divisor, division
    assert np.all(norms <= clip * (1 + 2 * (n + 2) * F32_U))
    raw = np.sqrt(sum((u.astype(np.float64) ** 2).reshape(n_rows, -1).sum(1) for u in ups))
    short = raw < clip * (1 - 2 * (n + 2) * F32_U)
    assert short.sum() > 10 and np.all(div[short] == 1.0)
    assert np.all(norms[raw > clip * 1.01] >= clip * (1 - 2 * (n + 2) * F32_U))  # long ones end at C


@pytest.mark.parametrize("sampling,q,n_users", [("fixed", 0.5, 6), ("poisson", 0.3, 10)])
def test_noise_std_is_sigma_c_over_the_expected_participants(sampling, q, n_users):
    """Every update 0 and every value 0: the output is the noise on the mean alone, iid N(0, t^2)
    per coordinate with t = sigma C / D (D = k or q N). sum z^2 / t^2 over n draws is chi-square(n):
    its 99.99 % interval bounds the measured variance (a test that fails 1 in 10^4 by chance; the
    draws are fixed by the keys, so it passes or fails the same every run)."""
    m = get_method("fedavg")
    shape = {ATTN: (7, 50, 40), GEN: (7, 1, 5, 2), SPEC: (7, 1, 5, 2), ROUTER: (7, 5, 2)}
    zero = {k: np.zeros(s, np.float32) for k, s in shape.items()}
    dp = privacy.DP(clip=2.0, noise_multiplier=1.3, q=q, n_users=n_users, sampling=sampling)
    t = dp.noise_multiplier * dp.clip / dp.expected
    w = np.array([1, 1, 1, 1, 1, 1, 0.0])
    draws = []
    for r in range(5):
        got = _server(m, dp, zero, zero, w * dp.expected / 3, privacy.noise_keys([0, 1], r))[ATTN]
        assert np.all(got[:3] == got[0]) and np.all(got[3:] == got[3])  # one draw per federation
        assert not np.allclose(got[0], got[3])  # ... independent between federations
        draws += [got[0].ravel(), got[3].ravel()]
    z = np.concatenate(draws).astype(np.float64)
    n = z.size
    lo, hi = scipy.stats.chi2.ppf([5e-5, 1 - 5e-5], n) / n
    assert lo < np.mean(z ** 2) / t ** 2 < hi, (np.std(z), t)
    assert abs(z.mean()) < 4 * t / math.sqrt(n)
    again = _server(m, dp, zero, zero, w * dp.expected / 3, privacy.noise_keys([0, 1], 4))[ATTN]
    np.testing.assert_array_equal(again[0].ravel(), draws[-2])  # the same seed and round: the same noise


@pytest.mark.parametrize("method", ["fedavg", "comigs"])
def test_sigma_0_and_c_inf_is_the_mean_bit_for_bit_on_the_server(method):
    m = get_method(method)
    start = {k: np.broadcast_to(v[[0, 0, 0, 3, 3, 3, 3]], v.shape).copy() for k, v in _flat(3).items()}
    flat = {k: start[k] + _flat(4)[k] for k in start}
    w = np.array([1, 1, 0, 1, 0, 1, 0.0])  # fixed sampling of k = 2 of 3 users in each federation
    dp = privacy.DP(clip=math.inf, noise_multiplier=0.0, q=2 / 3, n_users=3)
    got = _server(m, dp, flat, start, w)
    mean = _server(m, dp, flat, start, w, name="mean")
    for k in flat:
        np.testing.assert_array_equal(got[k], mean[k], err_msg=str(k))


def test_sigma_0_and_c_inf_trains_as_fedavg_bit_for_bit():
    """Two stacked federations, fixed-size sampling of 2 of 4 users, 2 rounds: every trained leaf of
    the DP run equals FedAvg's exactly."""
    from comigs_jax.experiment.simulation import Simulation
    from comigs_jax.train.state import TrainConfig
    from tiny import markov_users, tiny_base, tiny_cfg
    cfg, tc = tiny_cfg(), TrainConfig(rounds=2, local_steps=2, batch_size=2, seq_len=8)
    train, valid = markov_users(4, 200, 0), markov_users(4, 100, 100)

    def run(dp):
        sim = Simulation(cfg, tc, get_method("fedavg"), tiny_base(cfg), train, valid,
                         federations=[{"seed": 1}, {"seed": 2}], participation=0.5, dp=dp)
        for _ in range(2):
            sim.run_round()
            sim.aggregate()
        return sim
    plain, dp = run(None), run(privacy.DP(clip=math.inf, noise_multiplier=0.0, q=0.5, n_users=4, rounds=2))
    assert (plain.server.name, dp.server.name) == ("mean", "dp_mean")
    for a, b in zip(jax.tree.leaves(plain.states.params), jax.tree.leaves(dp.states.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _direct_epsilon(sampling, q, n, k, sigma, rounds, delta):
    """epsilon from dp_accounting directly: the events named in accounting's docstring."""
    if sampling == "poisson":
        acc = dpa.rdp.RdpAccountant()
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), rounds)
    else:
        acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        acc.compose(dpa.SampledWithoutReplacementDpEvent(n, k, dpa.GaussianDpEvent(sigma / 2)), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_epsilon_is_dp_accountings_for_the_sampling_used(sampling):
    dp = privacy.DP(clip=1.0, noise_multiplier=1.1, delta=1e-4, sampling=sampling, q=0.1, n_users=250, rounds=30)
    for t in (1, 7, 30):
        assert accounting.epsilon(dp, t) == pytest.approx(
            _direct_epsilon(sampling, 0.1, 250, 25, 1.1, t, 1e-4), rel=1e-12)
    assert accounting.epsilon(dataclasses.replace(dp, noise_multiplier=0.0), 3) == math.inf


def test_a_published_epsilon_is_reproduced():
    """Abadi et al., *Deep Learning with Differential Privacy* (CCS 2016), Sec. 3.1: q = 0.01,
    sigma = 4, delta = 1e-5, T = 10000 give epsilon ~ 1.26 with the moments accountant (integer
    moments lambda <= 32, delta = min_lambda exp(alpha(lambda) - lambda eps)). The moments
    accountant's alpha(lambda) is lambda times the RDP at order lambda + 1, so dp_accounting's RDP
    at orders 2..33 with that conversion is their number; our accountant's (more orders, the
    tighter RDP-to-DP conversion dp_accounting uses) can only be lower."""
    orders = np.arange(2, 34)
    acc = dpa.rdp.RdpAccountant(orders=orders)
    acc.compose(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(4.0)), 10_000)
    eps_moments = float(np.min(acc._rdp + np.log(1e5) / (orders - 1)))
    assert round(eps_moments, 2) == 1.26
    dp = privacy.DP(clip=1.0, noise_multiplier=4.0, delta=1e-5, sampling="poisson", q=0.01, n_users=60_000,
                    rounds=10_000)
    assert accounting.epsilon(dp, 10_000) <= eps_moments


def test_target_epsilon_calibrates_the_smallest_sigma_that_meets_it():
    dp = privacy.DP(clip=1.0, noise_multiplier=99.0, delta=1e-3, target_epsilon=4.0, sampling="poisson", q=0.1,
                    n_users=256, rounds=20)
    got = accounting.calibrated(dp)
    assert accounting.epsilon(got, 20) <= 4.0 < accounting.epsilon(
        dataclasses.replace(got, noise_multiplier=got.noise_multiplier - 2e-3), 20)
    assert accounting.calibrated(dataclasses.replace(dp, target_epsilon=0.0)).noise_multiplier == 99.0


def test_poisson_participation_counts_and_fixed_sampling_unchanged():
    """Poisson: each round's count is Binomial(N, q) and each user's inclusions over R rounds
    Binomial(R, q), independently: the mean count within 4 standard errors, the counts' variance
    and the users' inclusion counts within their chi-square 99.99 % intervals (normal approximation:
    N q = 15, R q = 120). Fixed-size sampling draws what it drew before Poisson existed (the
    generator of seed + 1, rng.choice(N, k, replace=False) per round)."""
    from comigs_jax.experiment.simulation import Simulation
    from comigs_jax.train.state import TrainConfig
    from tiny import markov_users, tiny_base, tiny_cfg
    cfg, tc = tiny_cfg(), TrainConfig(rounds=2, local_steps=1, batch_size=2, seq_len=8)
    n, q, rounds = 50, 0.3, 400
    train = markov_users(1, 100, 0) * n
    sim = Simulation(cfg, tc, get_method("fedavg"), tiny_base(cfg), train, train, seed=3, participation=q,
                     sampling="poisson")
    active = np.stack([sim.sample_participants()[:n] for _ in range(rounds)])
    counts, per_user = active.sum(1), active.sum(0)
    assert abs(counts.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / rounds)
    lo, hi = scipy.stats.chi2.ppf([5e-5, 1 - 5e-5], rounds - 1) / (rounds - 1)
    assert lo < counts.var(ddof=1) / (n * q * (1 - q)) < hi
    stat = float(((per_user - rounds * q) ** 2).sum() / (rounds * q * (1 - q)))
    assert scipy.stats.chi2.ppf(5e-5, n) < stat < scipy.stats.chi2.ppf(1 - 5e-5, n)
    fixed = Simulation(cfg, tc, get_method("fedavg"), tiny_base(cfg), train, train, seed=3, participation=q)
    rng, k = np.random.default_rng(4), round(q * n)
    for _ in range(5):
        want = np.zeros(n, bool)
        want[rng.choice(n, k, replace=False)] = True
        np.testing.assert_array_equal(fixed.sample_participants()[:n], want)


def test_dp_server_is_chosen_only_for_the_mean():
    assert server_for(get_method("comigs"), ranked=False, private=True) is SERVERS["dp_mean"]
    assert server_for(get_method("comigs"), ranked=False) is SERVERS["mean"]


@pytest.mark.parametrize("overrides,message", [
    ({"dp.noise_multiplier": -1.0}, "config.dp.noise_multiplier=-1.0 is not allowed: a finite number >= 0"),
    ({"dp.clip": 0.0}, "config.dp.clip=0.0 is not allowed: a number > 0"),
    ({"dp.clip": -2.0}, "config.dp.clip=-2.0 is not allowed: a number > 0"),
    ({"dp.delta": 1.0}, "config.dp.delta=1.0 is not allowed: in (0, 1)"),
    ({"dp.delta": 0.0}, "config.dp.delta=0.0 is not allowed: in (0, 1)"),
    ({"federation.participation": 1.5}, "config.federation.participation=1.5 is not allowed: in (0, 1]"),
    ({"federation.participation": 0.0}, "config.federation.participation=0.0 is not allowed: in (0, 1]"),
    ({"federation.sampling": "uniform"}, "config.federation.sampling='uniform' is not allowed: fixed | poisson"),
    ({"dp.target_epsilon": 0.001, "dp.delta": 1e-5},  # sigma = 1000 still gives 0.0055 (RDP's orders <= 1024)
     "config.dp.target_epsilon=0.001 is not allowed: an epsilon the accountant can reach at dp.delta=1e-05 in "
     "train.rounds=4 rounds"),
    ({"method": "local"}, "config.dp.enabled=True is not allowed: False for method local, which shares nothing"),
    ({"method": "pcl"}, "config.dp.enabled=True is not allowed: False for method pcl, which mixes whole models"),
    ({"method": "hetlora"}, "config.dp.enabled=True is not allowed: False for method hetlora"),
    ({"model.ranks": "2,4,4"}, "config.dp.enabled=True is not allowed: False for method fedavg, which has per-user"),
    ({"method": "comigs", "model.n_generalists": 0, "model.attn_rank": 0},
     "config.dp.enabled=True is not allowed: False for method comigs with model.attn_rank=0, model.n_generalists=0"),
    ({"federation.weighting": "tokens"}, "config.federation.weighting='tokens' is not allowed: uniform with dp"),
])
def test_bad_dp_input_is_one_line_before_any_work(overrides, message):
    from comigs_jax import configuration
    from comigs_jax.errors import ConfigError
    from configs import tiny
    cfg = tiny.get_config("fedavg")
    cfg.dp.enabled, cfg.dp.delta, cfg.federation.sampling = True, 0.01, "poisson"
    for k, v in overrides.items():
        group, key = k.split(".") if "." in k else (None, k)
        if group is None:
            cfg[key] = v
        else:
            cfg[group][key] = v
    with pytest.raises(ConfigError) as e:
        configuration.validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_dp_run_logs_epsilon_each_round_reports_privacy_and_resumes_bit_for_bit(tiny_cache, tmp_path):
    """configs/tiny.py as FedAvg under DP (Poisson sampling, sigma calibrated to epsilon 8): each
    metrics line's epsilon is dp_accounting's after that many rounds, results.json says what is
    private and what never leaves the device, and a run resumed from round 2 (the noise of rounds
    3, 4 drawn again from the seed and the round) writes the same results."""
    import json
    import os
    import shutil

    from entrypoint import main as run
    from tiny import as_if_killed_after_round
    wd = str(tmp_path / "dp")
    args = ["--config=configs/tiny.py", "--config.method=comigs", "--config.dp.enabled=True",
            "--config.dp.target_epsilon=8", "--config.dp.delta=0.01", "--config.dp.clip=0.5",
            "--config.federation.sampling=poisson", "--config.federation.participation=0.67",
            "--config.output.figures=False"]
    p = run([*args, f"--workdir={wd}"], tiny_cache)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(os.path.join(wd, "results.json")))
    priv = res["privacy"]
    sigma = priv["noise_multiplier"]
    records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["dp_epsilon"] for r in records] == pytest.approx(
        [_direct_epsilon("poisson", 0.67, 3, None, sigma, t, 0.01) for t in (1, 2, 3, 4)], rel=1e-12)
    assert priv["epsilon"] == records[-1]["dp_epsilon"] <= 8.0 and priv["target_epsilon"] == 8.0
    assert priv["sampling"] == "poisson" and priv["expected_participants"] == pytest.approx(0.67 * 3)
    assert priv["local"] == "specialist, router: never leave the device and cost no privacy"
    assert "User-level DP of the shared leaves: epsilon" in open(os.path.join(wd, "results.md")).read()
    wd2 = str(tmp_path / "resumed")
    shutil.copytree(wd, wd2)
    as_if_killed_after_round(wd2)  # as if killed after round 2's checkpoint
    p = run([*args, f"--workdir={wd2}"], tiny_cache)
    assert p.returncode == 0 and "resumed from round 2" in p.stdout, p.stderr[-3000:]
    again = json.load(open(os.path.join(wd2, "results.json")))
    for key in ("speed", "provenance"):  # wall-clock timings, and when and where it ran
        res.pop(key), again.pop(key)
    assert again == res


def test_a_server_optimizer_steps_with_the_noised_mean():
    """DP then FedAvgM-style sgd at lr 1, momentum 0: x - 1 (x - noised mean) is the noised mean
    (float32: |x| + |mean| ~ 4, a difference of two such numbers within 4e-6); the composed server
    is chosen in the one place (dp_mean, then the optimizer)."""
    from comigs_jax.federated.server import Rows
    from comigs_jax.federated.server_optimizer import ServerOptimizer
    m = get_method("comigs")
    composed = server_for(m, ranked=False, optimizer=ServerOptimizer("sgd"), private=True)
    assert composed.name == "dp_mean+sgd" and composed.needs_start
    start = {k: np.broadcast_to(v[[0, 0, 0, 3, 3, 3, 3]], v.shape).copy() for k, v in _flat(5).items()}
    flat = {k: start[k] + _flat(6, 0.3)[k] for k in start}
    w = np.array([1, 1, 0, 1, 1, 0, 0.0])
    dp = privacy.DP(clip=0.5, noise_multiplier=1.0, q=2 / 3, n_users=3)
    setup = Setup(m, n_shared_specialists=1, n_groups=2, dp=dp)
    nest = lambda f: traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in f.items()})
    state = composed.init(setup, Rows(7, GROUPS, ({"seed": 0, "server.lr": 1.0}, {"seed": 1, "server.lr": 1.0})))
    state = composed.start(setup, nest(start), jax.tree.map(jnp.asarray, state))
    up = Uploads(jnp.asarray(w, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(GROUPS, jnp.int32),
                 nest({k: v for k, v in start.items() if m.is_shared(k)}), jnp.asarray(privacy.noise_keys([0, 1], 0)))
    out, _ = jax.jit(lambda p, u, s: composed.apply(setup, p, u, s))(nest(flat), up, state)
    got = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(out).items()}
    want = _server(m, dp, flat, start, w)
    for k in flat:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=4e-6, err_msg=str(k))
    silent = np.array([1, 1, 0, 0, 0, 0, 0.0])  # federation 1 without uploads: its noised mean still released
    up = up._replace(weights=jnp.asarray(silent, jnp.float32), n_tokens=jnp.asarray(silent, jnp.float32))
    out, _ = jax.jit(lambda p, u, s: composed.apply(setup, p, u, s))(nest(flat), up, state)
    got = np.asarray(traverse_util.flatten_dict(out)[ATTN])
    np.testing.assert_allclose(got, _server(m, dp, flat, start, silent)[ATTN], rtol=0, atol=4e-6)
    assert not np.allclose(got[3:], start[ATTN][3:], atol=1e-3)
