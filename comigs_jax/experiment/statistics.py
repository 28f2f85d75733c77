"""Statistics over seeds for the studies: pure functions over arrays (NumPy, scipy.stats).

Lower is better everywhere (test perplexity).

* `describe(x)`: n_seeds, mean, the sample std (ddof 1) and the two-sided 95 % Student t
  confidence interval of the mean, mean ± t_{0.975, n-1} std / sqrt(n). With one seed the std and
  the interval are None (there is no spread to measure).
* `paired(a, b)`: a and b measured on the same seeds (index i of both is seed i); the mean of
  the differences a - b and its 95 % Student t interval (scipy.stats.ttest_rel's interval).
  Negative: a is lower (better).
* `verdict(arms)`: every pair of arms compared paired by seed. Arm A *beats* arm B when the
  interval of A - B lies entirely below 0. The *winner* is the arm that beats every other arm. A
  cell without a winner is a *tie*, and `tied` names the arms not beaten by any other arm (with a
  winner, `tied` is [winner]). Two facts make this well defined: A beats B implies mean A < mean
  B, so the arm with the lowest mean is never beaten and `tied` is never empty; and "beats" is
  transitive (the sample std of (A - B) + (B - C) is at most the sum of theirs, at the same t
  quantile), so every beaten arm is beaten by an unbeaten one, and a single unbeaten arm beats
  every other: it is the winner.

The intervals are per comparison (no correction for the number of pairs), and cover the
randomness the seeds vary (in this code base the initialisation and the batch order, not the
data draw; docs/studies.md).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

LEVEL = 0.95


def _t(n: int) -> float:
    from scipy import stats  # here, not at import: every run's process imports this module (0.7 s)
    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def describe(x) -> dict:
    """{"n_seeds", "mean", "std" (ddof 1), "ci95": [lo, hi]} of the values over seeds (1-D)."""
    x = np.asarray(x, np.float64).ravel()
    n = len(x)
    if n == 0:
        raise ValueError("describe: no values")
    mean = float(x.mean())
    if n < 2:
        return {"n_seeds": n, "mean": mean, "std": None, "ci95": None}
    std = float(x.std(ddof=1))
    half = _t(n) * std / math.sqrt(n)
    return {"n_seeds": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired(a, b) -> dict:
    """{"n_seeds", "diff" (mean of a - b), "std" (of a - b, ddof 1), "ci95": [lo, hi]}: a and b
    paired by index (seed). The interval is None with fewer than 2 pairs."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired: {a.shape[0]} values against {b.shape[0]}; pair them by seed")
    d = describe(a - b)
    return {"n_seeds": d["n_seeds"], "diff": d["mean"], "std": d["std"], "ci95": d["ci95"]}


def beats(pair: dict) -> int:
    """+1 when the interval of a - b lies below 0 (a better), -1 above 0 (b better), 0 otherwise
    (it includes 0, or there is no interval)."""
    ci = pair["ci95"]
    if ci is None:
        return 0
    return 1 if ci[1] < 0 else -1 if ci[0] > 0 else 0


def verdict(arms: dict, per_user: dict | None = None) -> dict:
    """Paired comparison of every pair of arms: {name: values over the common seeds [S]} (the
    same seed at the same index in every arm). per_user: optionally {name: [S, U]} for the
    per-user differences. Returns {"pairs": [{"a", "b", "n_seeds", "diff", "std", "ci95",
    "beats": "a" | "b" | None, "per_user": [...]}], "winner": name | None, "tied": [names]}."""
    names = list(arms)
    pairs, beaten, wins = [], {n: set() for n in names}, {n: set() for n in names}
    for a, b in itertools.combinations(names, 2):
        p = paired(arms[a], arms[b])
        w = beats(p)
        p = {"a": a, "b": b, **p, "beats": a if w > 0 else b if w < 0 else None}
        if per_user is not None:
            ua, ub = np.asarray(per_user[a], np.float64), np.asarray(per_user[b], np.float64)
            p["per_user"] = [paired(ua[:, u], ub[:, u]) for u in range(ua.shape[1])]
        if w:
            win, lose = (a, b) if w > 0 else (b, a)
            wins[win].add(lose)
            beaten[lose].add(win)
        pairs.append(p)
    winner = next((n for n in names if len(names) > 1 and len(wins[n]) == len(names) - 1), None)
    tied = [winner] if winner is not None else [n for n in names if not beaten[n]]
    return {"pairs": pairs, "winner": winner, "tied": tied}


def sentence(pair: dict, fmt: str = "{:.3f}") -> str:
    """The finding of one pair, in words: 'A beats B by x [lo, hi]' (x > 0: how much lower the
    winner is), or 'no detectable difference between A and B (CI [lo, hi] of A - B)'."""
    f = lambda v: fmt.format(v)
    a, b, ci = pair["a"], pair["b"], pair["ci95"]
    if ci is None:
        return f"{a} against {b}: {f(pair['diff'])} (A - B) from {pair['n_seeds']} seed, no interval"
    if pair["beats"] == a:
        return f"{a} beats {b} by {f(-pair['diff'])} [{f(-ci[1])}, {f(-ci[0])}]"
    if pair["beats"] == b:
        return f"{b} beats {a} by {f(pair['diff'])} [{f(ci[0])}, {f(ci[1])}]"
    return f"no detectable difference between {a} and {b} (CI [{f(ci[0])}, {f(ci[1])}] of {a} − {b})"
