"""A study's results summarised: study.json (statistics over seeds, paired comparisons), study.md
(tables and the generated findings) and study.png.

Per cell and method, over the seeds: n_seeds, mean, the sample std (ddof 1) and the 95 % Student
t interval of the mean, per user and for the mean over users (comigs_jax.experiment.statistics).
The methods of a cell are compared paired by seed on the mean over users of the test perplexity;
a study whose cells hold one method each compares its cells the same way (on their common seeds),
and otherwise each method is compared with itself between the cells that differ in one grid axis
(on equal seeds). A comparison names a winner (it beats every other arm with an interval excluding
0) or a tie and its tied set (statistics.verdict). The comparisons are functions of study.json's
rows alone, so `regenerate` rewrites a study's outputs from its study.json without a run.
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np

from comigs_jax import configuration
from comigs_jax.errors import ExperimentError
from comigs_jax.experiment import statistics, study_interactions
from comigs_jax.experiment.study_figure import _shown

STATISTICS = ("std: sample std over seeds (ddof 1); ci95: 95 % Student t interval of the mean; "
              "comparisons: paired by seed, mean difference a - b of the mean over users of the test "
              "perplexity and its 95 % Student t interval; a winner beats every other arm with an interval "
              "excluding 0, otherwise the arms no other arm beats are tied (comigs_jax/experiment/statistics.py)")


def _comm_bytes(res: dict) -> float:
    c = res.get("communication") or {}
    up, down = c.get("upload_bytes_float32"), c.get("download_bytes_float32")
    if up is None or down is None:
        return float("nan")
    return float(np.mean(np.asarray(up, float) + np.asarray(down, float)))


def method_row(runs: dict, method: str, seeds: list[int]) -> dict:
    """One method of a cell: {seeds, per_seed [S, U], n_seeds, mean / std / ci95 per user,
    user_mean / user_mean_std / user_mean_ci95 (the mean over users), communication, and on
    synthetic data bayes_ppl and over_bayes / over_bayes_std / over_bayes_ci95}."""
    per_seed = np.asarray([[u["test_ppl"] for u in runs[method, s]["users"]] for s in seeds], np.float64)
    users = [statistics.describe(per_seed[:, u]) for u in range(per_seed.shape[1])]
    overall = statistics.describe(per_seed.mean(axis=1))
    row = {"seeds": list(seeds), "per_seed": per_seed.tolist(), "n_seeds": len(seeds),
           "mean": [d["mean"] for d in users], "std": [d["std"] for d in users], "ci95": [d["ci95"] for d in users],
           "user_mean": overall["mean"], "user_mean_std": overall["std"], "user_mean_ci95": overall["ci95"],
           "communication_bytes_per_user": _comm_bytes(runs[method, seeds[0]])}
    users0 = runs[method, seeds[0]]["users"]
    if "bayes_ppl" in users0[0]:
        bayes = np.asarray([u["bayes_ppl"] for u in users0], np.float64)
        ratio = statistics.describe((per_seed / bayes).mean(axis=1))
        row.update(bayes_ppl=bayes.tolist(), over_bayes=ratio["mean"], over_bayes_std=ratio["std"],
                   over_bayes_ci95=ratio["ci95"])
    return row


def compare(rows: dict) -> dict | None:
    """statistics.verdict over {arm: method row} on their common seeds; None for one arm or no
    common seed. Per user only when every arm has the same users (a grid over data.n_users has not)."""
    common = sorted(set.intersection(*(set(r["seeds"]) for r in rows.values()))) if rows else []
    if len(rows) < 2 or not common:
        return None
    pick = {k: np.asarray(r["per_seed"])[[r["seeds"].index(s) for s in common]] for k, r in rows.items()}
    same_users = len({v.shape[1] for v in pick.values()}) == 1
    out = statistics.verdict({k: v.mean(axis=1) for k, v in pick.items()}, per_user=pick if same_users else None)
    return {"metric": "test ppl, mean over users", "seeds": common, **out}


def tuned_cells(out_cells: list[dict], key: str) -> list[dict]:
    """The cells with `key` tuned away: per combination of the other grid values, each method's row
    at its best value of `key` (the lowest mean over seeds of the mean over users), "picked" naming
    that value, and the methods compared there (paired by seed). The choice is made on the same
    test numbers the comparison uses (docs/studies.md: a selection among few values)."""
    from comigs_jax.experiment.study import cell_name
    groups: dict = {}
    for c in out_cells:
        rest = {k: v for k, v in c["shown"].items() if k != key}
        groups.setdefault(json.dumps(rest, sort_keys=True), (rest, []))[1].append(c)
    out = []
    for rest, members in groups.values():
        methods = list(dict.fromkeys(m for c in members for m in c["methods"]))
        rows, picked = {}, {}
        for m in methods:
            best = min((c for c in members if m in c["methods"]), key=lambda c: c["methods"][m]["user_mean"])
            rows[m], picked[m] = best["methods"][m], best["shown"][key]
        out.append({"name": cell_name(rest), "shown": rest,
                    "values": {k: v for k, v in members[0]["values"].items() if k != key},
                    "users": members[0]["users"], "methods": rows, "picked": picked, "comparison": compare(rows)})
    return out


def summarise(cfg, cells: list[dict], results: dict, unavailable: list[dict], timings: dict | None = None) -> dict:
    """study.json's content: per cell and method the statistics of method_row, then the
    comparisons of with_comparisons (computed from those rows alone)."""
    from comigs_jax.experiment.study import parse_grid, strip_study
    out_cells = []
    for cell in cells:
        res = results[cell["name"]]
        methods = configuration.methods_of(cell["config"])
        seeds = configuration.seeds_of(cell["config"])
        entry = {"name": cell["name"], "values": cell["values"], "shown": cell["shown"],
                 "methods": {m: method_row(res, m, seeds) for m in methods}}
        entry["users"] = list(res[methods[0], seeds[0]]["data"]["users"])
        entry["comparison"] = None  # with_comparisons
        if timings and cell["name"] in timings:
            entry["wall_s"] = round(timings[cell["name"]], 1)
        out_cells.append(entry)
    tune = cfg.study.get("tune", "")
    axes = parse_grid(cfg.study.grid)
    summary = {"study": cfg.study.name, "description": cfg.study.description, "grid": cfg.study.grid,
               "axes": [{"keys": list(k), "values": [list(v) for v in vals]} for k, vals in axes],
               "methods": configuration.methods_of(strip_study(cfg)) if not any(
                   "methods" in k for k, _ in axes) else None,
               "statistics": STATISTICS, "cells": out_cells, "tuned": {"key": tune, "cells": None} if tune else None,
               "across_cells": None, "per_method_across_cells": None,
               "per_user_findings": bool(cfg.study.get("per_user_findings", False)), "unavailable": unavailable,
               "per_user_limit": cfg.output.get("per_user_limit", 64), "figure": cfg.study.figure}
    return with_comparisons(summary)


def with_comparisons(summary: dict) -> dict:
    """Set study.json's comparisons from its cells' method rows alone (a run and `regenerate` alike):
    each cell's methods (`comparison`), the tuned rows (study.tune), the cells of one method each
    (`across_cells`, not with study.tune), and otherwise each method between the cells that differ
    in one grid axis (`per_method_across_cells`) and each pair of methods' changes between those
    cells (`interactions`), and for a grid of two axes or more each method's change along one axis
    at two values of another (`two_axes`; study_interactions). Returns `summary`, updated in place."""
    cells = summary["cells"]
    for c in cells:
        c["comparison"] = compare(c["methods"])
    tuned = summary.get("tuned")
    if tuned:
        tuned["cells"] = tuned_cells(cells, tuned["key"])
    one_each = len(cells) > 1 and all(len(c["methods"]) == 1 for c in cells)
    summary["across_cells"] = (compare({c["name"]: next(iter(c["methods"].values())) for c in cells})
                               if one_each and not tuned else None)
    summary["per_method_across_cells"] = None if one_each else per_method_across_cells(summary)
    summary["interactions"] = study_interactions.interactions(summary)
    summary["two_axes"] = study_interactions.two_axes(summary)
    return summary


def per_method_across_cells(summary: dict) -> dict | None:
    """Each method compared with itself between cells that differ in exactly one grid axis (linked
    keys K1&K2 are one axis), the other axes at equal values: per method, axis and values of the
    other axes (a line of cells), `compare` of the method's rows in the line's cells, paired by seed,
    each arm named by its values on the axis. Pairing by seed needs equal seeds: a line whose cells
    ran different seeds is compared only within the groups of equal seeds and listed in `skipped`.
    {"blocks": [{"method", "axis", "at": {key: shown value}, "cells": {arm: cell}, "comparison"}],
    "skipped": [{"method", "axis", "at", "seeds": {"0,1,2": [cell, ...]}}]}; None without a line of
    two cells. With study.tune its axis is one of the axes (the raw cells, no selection)."""
    from comigs_jax.experiment.study import cell_name
    axes = [a["keys"] for a in summary["axes"]]
    methods = list(dict.fromkeys(m for c in summary["cells"] for m in c["methods"]))
    blocks, skipped = [], []
    for m, (i, keys) in itertools.product(methods, enumerate(axes)):
        others = [k for j, ks in enumerate(axes) if j != i for k in ks]
        lines: dict = {}
        for c in summary["cells"]:
            if m in c["methods"]:
                lines.setdefault(tuple(_shown(c, k) for k in others), []).append(c)
        for at, members in lines.items():
            where = {"method": m, "axis": "&".join(keys), "at": dict(zip(others, at))}
            groups: dict = {}
            for c in members:
                groups.setdefault(",".join(map(str, sorted(c["methods"][m]["seeds"]))), []).append(c)
            if len(members) > 1 and len(groups) > 1:
                skipped.append({**where, "seeds": {s: [c["name"] for c in g] for s, g in groups.items()}})
            for group in (g for g in groups.values() if len(g) > 1):
                arms = {cell_name({k: _shown(c, k) for k in keys}): c for c in group}
                blocks.append({**where, "cells": {a: c["name"] for a, c in arms.items()},
                               "comparison": compare({a: c["methods"][m] for a, c in arms.items()})})
    return {"blocks": blocks, "skipped": skipped} if blocks or skipped else None


def outcome(comparison: dict) -> str:
    """'A wins' or 'tie: A, B' of a comparison."""
    if comparison["winner"] is not None:
        return f"{comparison['winner']} wins"
    return "tie: " + ", ".join(comparison["tied"])


FINDINGS_HEADER = ("Generated from study.json (comigs_jax/experiment/study_report.py): arms compared paired by seed on "
                   "the test perplexity, mean over users; 'A beats B by x [lo, hi]': A's perplexity is lower by x, "
                   "with the 95 % Student t interval of the paired difference; a winner beats every other arm, "
                   "otherwise the arms no other arm beats are tied.")


def findings(summary: dict) -> list[str]:
    """The findings section of study.md, in markdown lines, from study.json's content alone: per
    comparison (each cell of several methods; the cells, for a study of one method per cell) the
    outcome, and every pair as a sentence (statistics.sentence)."""
    tuned = summary.get("tuned")
    if tuned:
        blocks = [(f"cell {c['name']}, each method at its best {tuned['key']} ("
                   + ", ".join(f"{m} {v}" for m, v in c["picked"].items()) + ")", c["comparison"], c["users"])
                  for c in tuned["cells"] if c.get("comparison")]
    else:
        blocks = [(f"cell {c['name']}", c["comparison"], c["users"]) for c in summary["cells"] if c.get("comparison")]
    if summary.get("across_cells"):
        blocks.append(("across the cells (one method each)", summary["across_cells"], summary["cells"][0]["users"]))
    if not blocks:
        return []
    lines = ["## Findings", "", FINDINGS_HEADER, ""]
    for what, comp, users in blocks:
        lines.append(f"- **{what}** ({len(comp['seeds'])} seeds): {outcome(comp)}.")
        for p in comp["pairs"]:
            lines += _pair_lines(p, "  ", users if summary.get("per_user_findings") else None)
    return lines


def _pair_lines(p: dict, indent: str, users: list | None, head: str = "- ") -> list[str]:
    """A pair's sentence at `indent` after `head`, and with `users` its per-user sentences below."""
    lines = [f"{indent}{head}{statistics.sentence(p)}"]
    if users is not None and "per_user" in p:
        lines += [f"{indent}  - {u}: " + statistics.sentence({**p, **pu, "beats": _winner_of(p, pu)})
                  for u, pu in zip(users, p["per_user"])]
    return lines


PER_METHOD_HEADER = ("Generated from study.json (study_report.per_method_across_cells): each method against itself "
                     "in the cells that differ in one grid axis, the other axes at the values named after 'at', "
                     "paired by seed on the test perplexity, mean over users; the arms are named by their values "
                     "on that axis, and read as the findings above.")


DATA_AXIS = (" (a `data.*` axis: its cells may be tested on different data, so a difference there is the data's "
             "as much as the method's)")


def per_method_findings(summary: dict) -> list[str]:
    """The section of study.md that compares each method across cells (per_method_across_cells),
    in markdown lines: per method and axis, per line of cells its outcome and every pair as a
    sentence (one sentence for a line of two cells), and the lines not paired for their seeds."""
    per = summary.get("per_method_across_cells")
    if not per:
        return []
    from comigs_jax.experiment.study import cell_name
    users = {c["name"]: c["users"] for c in summary["cells"]}
    lines = ["## Findings per method across cells", "", PER_METHOD_HEADER]
    heading = None
    for b in per["blocks"]:
        if (b["method"], b["axis"]) != heading:
            if heading is None or b["method"] != heading[0]:
                lines += ["", f"### {b['method']}", ""]
            heading = b["method"], b["axis"]
            lines.append(f"- **along `{b['axis']}`**" + (DATA_AXIS if b["axis"].startswith("data.") or "&data." in b["axis"] else ""))
        comp = b["comparison"]
        at = f"at {cell_name(b['at'])}" if b["at"] else "no other axis"
        pu = users[next(iter(b["cells"].values()))] if summary.get("per_user_findings") else None
        if len(comp["pairs"]) == 1:
            lines += _pair_lines(comp["pairs"][0], "  ", pu, f"- {at} ({len(comp['seeds'])} seeds): ")
            continue
        lines.append(f"  - {at} ({len(comp['seeds'])} seeds): {outcome(comp)}.")
        for p in comp["pairs"]:
            lines += _pair_lines(p, "    ", pu)
    if per["skipped"]:
        lines += ["", "Not paired (the cells of a line ran different seeds; compared only within equal seeds):", ""]
        lines += [f"- {s['method']} along `{s['axis']}` at {cell_name(s['at']) if s['at'] else 'no other axis'}: "
                  + "; ".join(f"seeds {k}: {', '.join(v)}" for k, v in s["seeds"].items()) for s in per["skipped"]]
    return lines


def _winner_of(pair: dict, part: dict):
    w = statistics.beats(part)
    return pair["a"] if w > 0 else pair["b"] if w < 0 else None


def _pm(mean, std, ci) -> str:
    if std is None:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {std:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _mark(c: dict, m: str) -> str:
    comp = c.get("comparison")
    if comp is None:
        return ""
    if comp["winner"] == m:
        return " **wins**"
    return " (tied)" if comp["winner"] is None and m in comp["tied"] else ""


def markdown(summary: dict) -> str:
    lines = [f"# Study {summary['study']}", ""]
    if summary["description"]:
        lines += [summary["description"], ""]
    lines += [f"Grid: `{summary['grid']}`. Test perplexity of the local models over seeds: mean ± sample std "
              "(ddof 1) [95 % Student t interval of the mean]; overall = the mean over users.", ""]
    bayes = any("bayes_ppl" in r for c in summary["cells"] for r in c["methods"].values())
    lines += ["| cell | method | seeds | overall | " + ("/ Bayes floor | " if bayes else "") + "comm. MiB/user | "
              "per user |", "|---|---|---|---|" + ("---|" if bayes else "") + "---|---|"]
    for c in summary["cells"]:
        for m, r in c["methods"].items():
            users = "; ".join(f"{u}: {_pm(a, b, ci)}" for u, a, b, ci in zip(c["users"], r["mean"], r["std"], r["ci95"]))
            if len(c["users"]) > summary.get("per_user_limit", len(c["users"])):  # 256 users: study.json only
                users = f"{len(c['users'])} users (above output.per_user_limit): in study.json"
            lines.append(f"| {c['name']} | {m}{_mark(c, m)} | {r['n_seeds']} | "
                         f"**{_pm(r['user_mean'], r['user_mean_std'], r['user_mean_ci95'])}** | "
                         + (f"{_pm(r['over_bayes'], r['over_bayes_std'], r['over_bayes_ci95'])} | " if bayes else "")
                         + f"{r['communication_bytes_per_user'] / 2 ** 20:.3f} | {users} |")
    if bayes:
        lines += ["", "Bayes floor (exact, per user) is listed per cell in study.json (`bayes_ppl`)."]
    if summary.get("tuned"):
        lines += tuned_table(summary, bayes)
    if summary["unavailable"]:
        lines += ["", "Not available (not run):", ""]
        lines += [f"- {u['cell']}: {u['why']}" for u in summary["unavailable"]]
    for found in (findings(summary), per_method_findings(summary), study_interactions.findings(summary),
                  study_interactions.two_axes_findings(summary)):
        if found:
            lines += [""] + found
    return "\n".join(lines) + "\n"


def tuned_table(summary: dict, bayes: bool) -> list[str]:
    key = summary["tuned"]["key"]
    lines = ["", f"Each method at its own best `{key}` (the lowest mean over seeds; the comparisons and findings "
             "use these rows):", "",
             f"| cell | method | {key} | overall | " + ("/ Bayes floor |" if bayes else ""),
             "|---|---|---|---|" + ("---|" if bayes else "")]
    for c in summary["tuned"]["cells"]:
        for m, r in c["methods"].items():
            lines.append(f"| {c['name']} | {m}{_mark(c, m)} | {c['picked'][m]} | "
                         f"**{_pm(r['user_mean'], r['user_mean_std'], r['user_mean_ci95'])}** | "
                         + (f"{_pm(r['over_bayes'], r['over_bayes_std'], r['over_bayes_ci95'])} |" if bayes else ""))
    return lines


def write_outputs(workdir: str, summary: dict, cfg=None, stem: str = "study") -> None:
    """<stem>.json, <stem>.md and <stem>.png in `workdir`; the figure kind is cfg.study.figure, else
    the summary's `figure`."""
    from comigs_jax.experiment.study_figure import figure
    for name, text in ((stem + ".json", json.dumps(summary, indent=1)), (stem + ".md", markdown(summary))):
        tmp = os.path.join(workdir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(workdir, name))
    figure(os.path.join(workdir, stem + ".png"), summary, cfg.study.figure if cfg is not None else summary["figure"])


class ReportError(ExperimentError):
    """A file `regenerate` cannot rewrite the outputs of: not a study.json."""


STUDY_JSON_KEYS = ("study", "description", "grid", "axes", "statistics", "cells", "unavailable")
ROW_KEYS = ("seeds", "per_seed", "n_seeds", "user_mean", "user_mean_std", "user_mean_ci95")


def read_study_json(path: str) -> dict:
    """The content of a study.json (what summarise wrote); ReportError (one line) for anything else."""
    bad = lambda what: ReportError(f"--report={path} is not a study.json ({what}); allowed: the study.json of "
                                   "a study run (or its copy, docs/studies/<name>.json)")
    try:
        with open(path) as f:
            summary = json.load(f)
    except OSError as e:
        raise bad(f"cannot be read: {e.strerror or type(e).__name__}") from None
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(summary, dict) or any(k not in summary for k in STUDY_JSON_KEYS):
        missing = [k for k in STUDY_JSON_KEYS if not isinstance(summary, dict) or k not in summary]
        raise bad(f"no {missing[0]!r} key")
    for c in summary["cells"] if isinstance(summary["cells"], list) else [None]:
        ok = isinstance(c, dict) and all(k in c for k in ("name", "shown", "methods", "users")) and isinstance(
            c["methods"], dict) and all(
            isinstance(r, dict) and all(k in r for k in ROW_KEYS) for r in c["methods"].values())
        if not ok:
            raise bad("a cell without name, shown, users or its methods' per-seed rows")
    return summary


def _figure_of(summary: dict) -> str:
    """The summary's figure kind; for a study.json from before it was recorded, the figure of the
    shipped configs/studies/<study>.py of that name, else lines."""
    if summary.get("figure"):
        return summary["figure"]
    from comigs_jax import cli
    path = os.path.join(cli.ROOT, "configs", "studies", summary["study"] + ".py")
    if os.path.isfile(path):
        cfg = cli.load_config_file(path)
        if cfg.study.name == summary["study"]:
            return cfg.study.figure
    return "lines"


def regenerate(path: str) -> dict:
    """A study's outputs rewritten from its study.json alone, no run: the comparisons recomputed from
    the cells' per-seed rows (with_comparisons; the rows, timings and the rest kept as they are),
    then <stem>.json, <stem>.md and <stem>.png beside `path` (docs/studies/participation.json ->
    docs/studies/participation.{json,md,png}). ReportError (one line) before writing anything for a
    file that is not a study.json. Returns the new content."""
    summary = read_study_json(path)
    summary["figure"] = _figure_of(summary)
    with_comparisons(summary)
    stem = os.path.splitext(os.path.basename(path))[0]
    write_outputs(os.path.dirname(os.path.abspath(path)), summary, stem=stem)
    return summary
