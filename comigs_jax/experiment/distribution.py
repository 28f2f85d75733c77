"""Per-user distributions of test perplexity: what a federated-learning paper reports for a
population (the median user, the spread, the worst 10 %), beside the per-user rows.

- metrics.jsonl: every evaluated round's record gets `test_ppl_quantiles` (`add_quantiles`);
  TensorBoard shows them as `test_ppl/p10`, `test_ppl/p50`, ... and a histogram `test_ppl/users`.
- results.json: `test_ppl_distribution` (`summary`: final, after aggregation, per evaluated round);
  results.md renders it (`markdown`) and `users.csv` holds every user's row (`users_csv`).
- Above `output.per_user_limit` users, TensorBoard gets no per-user tags and results.md no
  per-user table (the quantiles only; results.json and users.csv keep every user).
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np

QUANTILES = (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))
WORST_SHARE = 0.1  # the worst 10 %: the ceil(10 % of n) users of highest perplexity (at least one)
DEFAULT_LIMIT = 64  # output.per_user_limit's default (configs/base.py)


def quantiles(values) -> dict:
    """{p10, p50, p90, worst10_mean, n} of per-user perplexities (np.quantile, linear
    interpolation; worst10_mean: the mean of the ceil(0.1 n) highest)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"n": 0}
    out = {name: float(np.quantile(v, q)) for name, q in QUANTILES}
    k = max(1, math.ceil(WORST_SHARE * v.size))
    out["worst10_mean"] = float(np.sort(v)[-k:].mean())
    out["n"] = int(v.size)
    return out


def add_quantiles(record: dict) -> dict:
    """The record with `test_ppl_quantiles` when it holds the round's per-user test perplexity."""
    if isinstance(record.get("test_ppl"), list) and "test_ppl_quantiles" not in record:
        record["test_ppl_quantiles"] = quantiles(record["test_ppl"])
    return record


def summary(users: list[dict], records: list[dict] | None, per_user_limit: int) -> dict:
    """results.json's test_ppl_distribution: the final quantiles (local models before the final
    aggregation, as `test_ppl`), after aggregation, and those of every evaluated round."""
    rounds = [{"round": r["round"], **(r.get("test_ppl_quantiles") or quantiles(r["test_ppl"]))}
              for r in records or [] if isinstance(r.get("test_ppl"), list)]
    return {"final": quantiles([u["test_ppl"] for u in users]),
            "post_aggregation": quantiles([u["test_ppl_post_aggregation"] for u in users]),
            "rounds": rounds, "per_user_limit": int(per_user_limit)}


def per_user_shown(n_users: int, per_user_limit: int) -> bool:
    return n_users <= per_user_limit


def _row(name: str, q: dict) -> str:
    return f"| {name} | {q['p10']:.3f} | {q['p50']:.3f} | {q['p90']:.3f} | {q['worst10_mean']:.3f} |"


def markdown(dist: dict) -> list[str]:
    """results.md's lines: the final and per-round quantiles of per-user test perplexity."""
    f = dist["final"]
    if not f.get("n"):
        return []
    lines = [f"Per-user test perplexity over {f['n']} users (p10 / median / p90 / mean of the worst 10 %):", "",
             "| | p10 | p50 | p90 | worst 10 % mean |", "|---|---|---|---|---|",
             _row("final (before aggregation)", f), _row("after aggregation", dist["post_aggregation"])]
    lines += [_row(f"round {r['round']}", r) for r in dist["rounds"] if r.get("n")]
    return lines


COLUMNS = ("user", "test_ppl", "test_ppl_post_aggregation", "bayes_ppl", "zero_shot_ppl", "generalist_share",
           "generalist_selection")


def users_csv(users: list[dict]) -> str:
    """users.csv: one row per user, the per-user numbers of results.json (absent columns dropped)."""
    cols = [c for c in COLUMNS if c in users[0]] if users else list(COLUMNS[:3])
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(cols)
    for u in users:
        w.writerow([u[c] if isinstance(u[c], str) else repr(float(u[c])) for c in cols])
    return out.getvalue()


def histogram_figure(path: str, users: list[dict], title: str) -> None:
    """test_ppl_histogram.png: the users' final test perplexity, with p10 / p50 / p90 marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    v = np.asarray([u["test_ppl"] for u in users], np.float64)
    q = quantiles(v)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(v, bins=min(50, max(5, int(np.sqrt(v.size)) * 2)), color="#4c72b0", alpha=0.85)
    for name, _ in QUANTILES:
        ax.axvline(q[name], color="k", ls=":" if name != "p50" else "-", lw=1)
        ax.text(q[name], ax.get_ylim()[1] * 0.95, name, fontsize=8, ha="center", va="top",
                bbox=dict(fc="white", ec="none", pad=0.5))
    ax.set_xlabel("test perplexity"), ax.set_ylabel("users")
    ax.set_title(f"{title}: {v.size} users, worst 10 % mean {q['worst10_mean']:.2f}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
