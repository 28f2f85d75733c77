"""comigs_jax.experiment.statistics against scipy.stats on fixed numbers: the sample std and the
Student t interval of a mean, the paired difference and its interval (ttest_rel), the winner / tie
rule (an interval excludes 0 exactly when ttest_rel's two-sided p < 0.05), and the generated
sentences."""
import itertools

import numpy as np
import pytest
from scipy import stats

from comigs_jax.experiment import statistics

X = np.array([31.02, 30.71, 31.40, 30.95, 31.18])
PPL = {  # five seeds of three methods; c is b plus a seed-dependent offset (paired, noisy)
    "a": np.array([30.10, 30.35, 29.90, 30.22, 30.05]),
    "b": np.array([30.60, 30.81, 30.55, 30.70, 30.49]),
    "c": np.array([30.52, 31.02, 30.41, 30.95, 30.44]),
}


@pytest.mark.parametrize("x", [X, X[:2], X[:3] * 10])
def test_describe_matches_scipy(x):
    d = statistics.describe(x)
    assert d["n_seeds"] == len(x)
    assert d["mean"] == pytest.approx(np.mean(x), rel=1e-14)
    assert d["std"] == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    np.testing.assert_allclose(d["ci95"], [lo, hi], rtol=1e-12)


def test_describe_one_seed_has_no_spread():
    assert statistics.describe([3.0]) == {"n_seeds": 1, "mean": 3.0, "std": None, "ci95": None}
    with pytest.raises(ValueError):
        statistics.describe([])


@pytest.mark.parametrize("a, b", list(itertools.permutations(PPL, 2)))
def test_paired_matches_ttest_rel(a, b):
    p = statistics.paired(PPL[a], PPL[b])
    ref = stats.ttest_rel(PPL[a], PPL[b])
    ci = ref.confidence_interval(0.95)
    assert p["diff"] == pytest.approx(np.mean(PPL[a] - PPL[b]), rel=1e-12)
    np.testing.assert_allclose(p["ci95"], [ci.low, ci.high], rtol=1e-10)
    # the interval excludes 0 exactly when the paired t-test rejects at 5 %
    assert (statistics.beats(p) != 0) == (ref.pvalue < 0.05)
    if statistics.beats(p):
        assert statistics.beats(p) == (1 if ref.statistic < 0 else -1)


def test_paired_refuses_unpaired_lengths():
    with pytest.raises(ValueError, match="pair them by seed"):
        statistics.paired([1.0, 2.0], [1.0, 2.0, 3.0])


def _reference_verdict(arms):
    """The rule, from scipy.stats: A beats B when ttest_rel(A, B) rejects with A lower."""
    beat = {(x, y) for x, y in itertools.permutations(arms, 2)
            if stats.ttest_rel(arms[x], arms[y]).pvalue < 0.05 and np.mean(arms[x]) < np.mean(arms[y])}
    winners = [x for x in arms if all((x, y) in beat for y in arms if y != x)]
    return (winners[0] if winners else None), [x for x in arms if not any((y, x) in beat for y in arms)]


@pytest.mark.parametrize("names", [("a", "b"), ("b", "c"), ("a", "b", "c"), ("b", "c", "a")])
def test_verdict_matches_the_rule_from_scipy(names):
    arms = {n: PPL[n] for n in names}
    v = statistics.verdict(arms)
    winner, tied = _reference_verdict(arms)
    assert v["winner"] == winner and v["tied"] == tied
    assert len(v["pairs"]) == len(names) * (len(names) - 1) // 2


def test_verdict_cases():
    rng = np.random.default_rng(0)
    base = 30 + rng.normal(0, 0.3, 6)  # the seed's effect, shared by every method (paired)
    arms = {"best": base - 1 + rng.normal(0, 0.01, 6), "mid": base + rng.normal(0, 0.01, 6),
            "twin": base + rng.normal(0, 0.01, 6)}
    v = statistics.verdict(arms)
    assert v["winner"] == "best" and v["tied"] == ["best"]
    v = statistics.verdict({k: arms[k] for k in ("mid", "twin")})
    # mid and twin differ only by noise: a tie naming both, unless ttest_rel says otherwise
    assert (v["winner"], v["tied"]) == _reference_verdict({k: arms[k] for k in ("mid", "twin")})
    per_user = {k: np.stack([v_, v_ + 1], axis=1) for k, v_ in arms.items()}
    v = statistics.verdict(arms, per_user=per_user)
    pu = v["pairs"][0]["per_user"]
    assert len(pu) == 2 and pu[1]["diff"] == pytest.approx(pu[0]["diff"])


def test_sentences():
    win = {"a": "comigs", "b": "local", "n_seeds": 5, "diff": -0.5, "ci95": [-0.7, -0.3], "beats": "comigs"}
    assert statistics.sentence(win) == "comigs beats local by 0.500 [0.300, 0.700]"
    lose = dict(win, diff=0.5, ci95=[0.3, 0.7], beats="local")
    assert statistics.sentence(lose) == "local beats comigs by 0.500 [0.300, 0.700]"
    tie = dict(win, diff=0.1, ci95=[-0.2, 0.4], beats=None)
    assert statistics.sentence(tie) == ("no detectable difference between comigs and local "
                                        "(CI [-0.200, 0.400] of comigs − local)")


def _results(method, seed, ppls, bayes=None):
    users = [{"user": f"user{u}", "test_ppl": p, **({"bayes_ppl": bayes[u]} if bayes else {})}
             for u, p in enumerate(ppls)]
    return {"method": method, "seed": seed, "users": users}


def test_run_comparison_reports_sample_std_intervals_and_paired_findings():
    """experiments.run's comparison (several methods x seeds) uses the studies' statistics."""
    from comigs_jax.experiment import metrics
    a = np.array([[10.0, 20.0], [11.0, 19.5], [10.4, 21.0]])  # [seeds, users]
    b = a + np.array([[1.0, 1.2], [0.7, 0.9], [1.1, 1.4]])
    res = [_results("local", s, a[i], [5.0, 6.0]) for i, s in enumerate((0, 1, 2))]
    res += [_results("comigs", s, b[i], [5.0, 6.0]) for i, s in enumerate((0, 1, 2))]
    table = metrics.comparison(res)
    row = table["methods"]["local"]
    np.testing.assert_allclose(row["std"], a.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(row["ci95"][1], stats.t.interval(0.95, 2, loc=a[:, 1].mean(), scale=stats.sem(a[:, 1])),
                               rtol=1e-12)
    assert row["user_mean_std"] == pytest.approx(a.mean(1).std(ddof=1), rel=1e-12)
    (pair,) = table["comparison"]["pairs"]
    ci = stats.ttest_rel(b.mean(1), a.mean(1)).confidence_interval(0.95)
    assert (pair["a"], pair["b"]) == ("comigs", "local") or (pair["a"], pair["b"]) == ("local", "comigs")
    sign = 1 if pair["a"] == "comigs" else -1
    np.testing.assert_allclose(sign * np.asarray(pair["ci95"])[::sign], [ci.low, ci.high], rtol=1e-10)
    assert table["comparison"]["winner"] == "local"
    md = metrics.comparison_markdown(table)
    assert f"local beats comigs by {(b - a).mean(1).mean():.3f} [{ci.low:.3f}, {ci.high:.3f}]" in md
    one = metrics.comparison([r for r in res if r["seed"] == 0])
    assert one["comparison"] is None and one["methods"]["local"]["std"] == [None, None]
    md1 = metrics.comparison_markdown(one)
    assert "One seed: no interval" in md1 and "experiments.study" in md1 and "beats" not in md1
