"""Whether a change of setting costs two methods differently, paired by seed: the interaction
findings of a study with several methods per cell.

For two cells x, y that differ in one grid axis (the lines of study_report.per_method_across_cells)
and two methods A, B run in both on the same seeds, per seed s the change of each method from x to
y, dA_s = A_y,s - A_x,s and dB_s = B_y,s - B_x,s (test perplexity, mean over users), and the paired
difference of the changes dA - dB with its 95 % Student t interval (statistics.paired). E.g. study i:
does DP cost FedAvg more perplexity than CoMiGS? That is the interval of (FedAvg at epsilon 2 - FedAvg
without DP) - (CoMiGS at epsilon 2 - CoMiGS without DP), which two per-method intervals that do not
overlap do not give.

For one method and two grid axes (`two_axes`), the same question along the grid: whether the method's
change from x1 to x2 on one axis differs between values y1 and y2 of another, per seed
(m[x2, y2] - m[x1, y2]) - (m[x2, y1] - m[x1, y1]); e.g. study i: is CoMiGS's cost of epsilon = 2 smaller
with a FedAvgM server than with the mean? The intervals are per comparison, uncorrected, as all the
studies' findings.
"""
from __future__ import annotations

import itertools

import numpy as np

from comigs_jax.experiment import statistics


def _per_seed(row: dict, seeds: list) -> np.ndarray:
    """[S] the row's mean over users at `seeds` (in that order)."""
    per_seed = np.asarray(row["per_seed"], np.float64)
    return per_seed[[row["seeds"].index(s) for s in seeds]].mean(axis=1)


def interactions(summary: dict, cells_by_name: dict | None = None) -> list[dict] | None:
    """Per line of per_method_across_cells (axis, other axes' values) and pair of its cells x, y
    (its arms, in the line's order) and pair of methods A, B run in both cells: {"axis", "at",
    "x", "y" (arm names), "a", "b" (methods), "change_a", "change_b" (mean changes from x to y), and
    statistics.paired(dA, dB) ("diff" = mean of dA - dB, "std", "ci95", "n_seeds")} on the seeds
    common to the four rows. None for a study with one method per cell or no such pair."""
    per = summary.get("per_method_across_cells")
    if not per:
        return None
    cells = cells_by_name or {c["name"]: c for c in summary["cells"]}
    lines: dict = {}  # (axis, at) -> {arm: cell name}: the same line for every method that has it
    for b in per["blocks"]:
        lines.setdefault((b["axis"], tuple(b["at"].items())), {}).update(b["cells"])
    out = []
    for (axis, at), arms in lines.items():
        for (x, cx), (y, cy) in itertools.combinations(arms.items(), 2):
            both = [m for m in cells[cx]["methods"] if m in cells[cy]["methods"]]
            for a, b in itertools.combinations(both, 2):
                rows = [cells[c]["methods"][m] for c in (cx, cy) for m in (a, b)]
                seeds = sorted(set.intersection(*(set(r["seeds"]) for r in rows)))
                if not seeds:
                    continue
                ax, bx, ay, by = (_per_seed(cells[c]["methods"][m], seeds) for c, m in
                                  ((cx, a), (cx, b), (cy, a), (cy, b)))
                da, db = ay - ax, by - bx
                out.append({"axis": axis, "at": dict(at), "x": x, "y": y, "a": a, "b": b,
                            "change_a": float(da.mean()), "change_b": float(db.mean()), **statistics.paired(da, db)})
    return out or None


def _signed(v: float, fmt: str) -> str:
    return ("+" if v >= 0 else "") + fmt.format(v)


def _difference(head: str, minus: str, of: str, it: dict, fmt: str) -> str:
    """head, then the paired difference of two changes in words: '{minus} is d [lo, hi]' when its
    interval excludes 0, else 'no detectable difference between the changes (CI [lo, hi] of {of})'."""
    s, ci = (lambda v: _signed(v, fmt)), it["ci95"]
    if ci is None:
        return f"{head}: {minus} is {s(it['diff'])} from {it['n_seeds']} seed, no interval"
    if statistics.beats(it):
        return f"{head}: {minus} is {s(it['diff'])} [{s(ci[0])}, {s(ci[1])}]"
    lo, hi = fmt.format(ci[0]), fmt.format(ci[1])
    return f"{head}: no detectable difference between the changes (CI [{lo}, {hi}] of {of})"


def sentence(it: dict, fmt: str = "{:.3f}") -> str:
    """One interaction in words: the two mean changes from x to y (signed: + is a rise of the
    perplexity, worse), then "A's change minus B's is d [lo, hi]" when the interval excludes 0, or
    "no detectable difference between the changes (CI [lo, hi] of A's − B's)"."""
    a, b = it["a"], it["b"]
    head = (f"from {it['x']} to {it['y']}, {a} changes by {_signed(it['change_a'], fmt)} and {b} by "
            f"{_signed(it['change_b'], fmt)}")
    return _difference(head, f"{a}'s change minus {b}'s", f"{a}'s − {b}'s", it, fmt)


def _section(title: str, header: str, found: list[dict], heading, sentence_of) -> list[str]:
    """A findings section of study.md: the title, the header, then per run of items with the same
    heading(it) that heading line and each item's sentence below it."""
    lines, last = [title, "", header], None
    for it in found:
        if heading(it) != last:
            last = heading(it)
            lines += ["", last]
        lines.append(f"  - {sentence_of(it)}")
    return lines


HEADER = ("Generated from study.json (comigs_jax/experiment/study_interactions.py): for two cells of one line "
          "above and two methods run in both, each method's change of the test perplexity (mean over users) "
          "from the first cell to the second, and the difference of the two changes paired by seed with its 95 % "
          "Student t interval: whether the change of setting costs (or gains) the methods differently.")


def findings(summary: dict) -> list[str]:
    """study.md's section of the interactions (summary["interactions"]), markdown lines; [] without."""
    found = summary.get("interactions")
    if not found:
        return []
    from comigs_jax.experiment.study import cell_name
    at = lambda it: f"at {cell_name(it['at'])}" if it["at"] else "no other axis"
    heading = lambda it: f"- **along `{it['axis']}`**, {at(it)} ({it['n_seeds']} seeds):"
    return _section("## Findings: do two methods change differently between cells?", HEADER, found, heading, sentence)


# ----------------------------------------------------------------------------- one method, two axes
def _arm(c: dict, keys) -> str:
    from comigs_jax.experiment.study import cell_name
    from comigs_jax.experiment.study_figure import _shown
    return cell_name({k: _shown(c, k) for k in keys})


def two_axes(summary: dict) -> list[dict] | None:
    """Per method, pair of grid axes (i, j), values of the other axes, and pairs of values x1, x2 on
    i and y1, y2 on j (in grid order): whether the change from x1 to x2 differs between y1 and y2,
    per seed (m[x2, y2] - m[x1, y2]) - (m[x2, y1] - m[x1, y1]) on the seeds common to the four rows.
    {"method", "axis", "by" (axis j), "at", "x", "y" (pairs of arm names), "change_y1", "change_y2"
    (mean changes), and statistics.paired(change at y2, change at y1)}; None without two axes."""
    from comigs_jax.experiment.study_figure import _shown
    axes = [a["keys"] for a in summary["axes"]]
    if len(axes) < 2:
        return None
    methods = list(dict.fromkeys(m for c in summary["cells"] for m in c["methods"]))
    out = []
    for m, (i, j) in itertools.product(methods, itertools.combinations(range(len(axes)), 2)):
        others = [k for n, ks in enumerate(axes) if n not in (i, j) for k in ks]
        groups: dict = {}
        for c in summary["cells"]:
            if m in c["methods"]:
                at = tuple((k, _shown(c, k)) for k in others)
                groups.setdefault(at, {})[_arm(c, axes[i]), _arm(c, axes[j])] = c
        for at, grid in groups.items():
            xs, ys = (list(dict.fromkeys(k[n] for k in grid)) for n in (0, 1))
            for (x1, x2), (y1, y2) in itertools.product(itertools.combinations(xs, 2), itertools.combinations(ys, 2)):
                four = [grid.get(k) for k in ((x1, y1), (x2, y1), (x1, y2), (x2, y2))]
                if any(c is None for c in four):
                    continue
                rows = [c["methods"][m] for c in four]
                seeds = sorted(set.intersection(*(set(r["seeds"]) for r in rows)))
                if not seeds:
                    continue
                a, b, c, d = (_per_seed(r, seeds) for r in rows)
                out.append({"method": m, "axis": "&".join(axes[i]), "by": "&".join(axes[j]),
                            "at": {k: v for k, v in at}, "x": [x1, x2], "y": [y1, y2],
                            "change_y1": float((b - a).mean()), "change_y2": float((d - c).mean()),
                            **statistics.paired(d - c, b - a)})
    return out or None


def two_axes_sentence(it: dict, fmt: str = "{:.3f}") -> str:
    """'from X1 to X2, m changes by +a at Y1 and by +b at Y2: at Y2 minus at Y1 is d [lo, hi]', or
    '...: no detectable difference between the changes (CI [lo, hi] of at Y2 − at Y1)'."""
    (x1, x2), (y1, y2) = it["x"], it["y"]
    head = (f"from {x1} to {x2}, {it['method']} changes by {_signed(it['change_y1'], fmt)} at {y1} and by "
            f"{_signed(it['change_y2'], fmt)} at {y2}")
    return _difference(head, f"at {y2} minus at {y1}", f"at {y2} − at {y1}", it, fmt)


TWO_AXES_HEADER = ("Generated from study.json (comigs_jax/experiment/study_interactions.py): for one method, two "
                   "grid axes and two values on each, the method's change of the test perplexity (mean over users) "
                   "along the first axis at each value of the second, and the difference of the two changes paired "
                   "by seed with its 95 % Student t interval: whether the effect of one axis depends on the other.")


def two_axes_findings(summary: dict) -> list[str]:
    """study.md's section of summary["two_axes"], markdown lines; [] without."""
    found = summary.get("two_axes")
    if not found:
        return []
    from comigs_jax.experiment.study import cell_name
    heading = lambda it: (f"- **{it['method']}: `{it['axis']}` by `{it['by']}`**"
                          + (f", at {cell_name(it['at'])}" if it["at"] else "") + f" ({it['n_seeds']} seeds):")
    return _section("## Findings: does one axis's effect depend on another? (per method)", TWO_AXES_HEADER, found,
                    heading, two_axes_sentence)
