"""Whether a change of setting costs two methods differently, paired by seed: the interaction
findings of a study with several methods per cell.

For two cells x, y that differ in one grid axis (the lines of study_report.per_method_across_cells)
and two methods A, B run in both on the same seeds, per seed s the change of each method from x to
y, dA_s = A_y,s - A_x,s and dB_s = B_y,s - B_x,s (test perplexity, mean over users), and the paired
difference of the changes dA - dB with its 95 % Student t interval (statistics.paired). E.g. study i:
does DP cost FedAvg more perplexity than CoMiGS? That is the interval of (FedAvg at epsilon 2 - FedAvg
without DP) - (CoMiGS at epsilon 2 - CoMiGS without DP), which two per-method intervals that do not
overlap do not give. The intervals are per comparison, uncorrected, as all the studies' findings.
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
        lines.setdefault((b["axis"], tuple(sorted(b["at"].items()))), {}).update(b["cells"])
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


def sentence(it: dict, fmt: str = "{:.3f}") -> str:
    """One interaction in words: the two mean changes from x to y (signed: + is a rise of the
    perplexity, worse), then "A's change minus B's is d [lo, hi]" when the interval excludes 0, or
    "no detectable difference between the changes (CI [lo, hi] of A's − B's)"."""
    s = lambda v: ("+" if v >= 0 else "") + fmt.format(v)
    a, b, ci = it["a"], it["b"], it["ci95"]
    head = f"from {it['x']} to {it['y']}, {a} changes by {s(it['change_a'])} and {b} by {s(it['change_b'])}"
    if ci is None:
        return f"{head}: {a}'s change minus {b}'s is {s(it['diff'])} from {it['n_seeds']} seed, no interval"
    if statistics.beats(it):
        return f"{head}: {a}'s change minus {b}'s is {s(it['diff'])} [{s(ci[0])}, {s(ci[1])}]"
    return (f"{head}: no detectable difference between the changes (CI [{fmt.format(ci[0])}, {fmt.format(ci[1])}] "
            f"of {a}'s − {b}'s)")


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
    lines = ["## Findings: do two methods change differently between cells?", "", HEADER]
    heading = None
    for it in found:
        if (it["axis"], tuple(sorted(it["at"].items()))) != heading:
            heading = it["axis"], tuple(sorted(it["at"].items()))
            at = f"at {cell_name(it['at'])}" if it["at"] else "no other axis"
            lines += ["", f"- **along `{it['axis']}`**, {at} ({it['n_seeds']} seeds):"]
        lines.append(f"  - {sentence(it)}")
    return lines
