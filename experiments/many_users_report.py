"""The many-users study, per language / domain group of users: from a study folder's study.json
and the population's manifest.json, each group's methods compared paired by seed (the mean over
the group's users of the test perplexity, comigs_jax/experiment/statistics.py), beside the overall
comparison; written as groups.json, a markdown report and a figure.

    python -m experiments.many_users_report --study=runs/study_many_users --corpus=data/many_users \\
        --out=docs/many_users.md --assets=docs/many_users
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from comigs_jax.experiment import statistics
from experiments.many_users_corpus import GROUPS, user_groups


def group_table(cell: dict, groups: dict) -> list[dict]:
    """Per group of users (then "all"): {group, n_users, methods: {m: describe}, verdict}, each a
    statistic over seeds of the mean over the group's users of a method's test perplexity; the
    methods paired on their common seeds. groups: {user: group} (users without one: 'other')."""
    methods = cell["methods"]
    seeds = sorted(set.intersection(*(set(r["seeds"]) for r in methods.values())))
    per = {m: np.asarray(r["per_seed"], np.float64)[[r["seeds"].index(s) for s in seeds]] for m, r in methods.items()}
    labels = [groups.get(u, "other") for u in cell["users"]]
    out = []
    for g in sorted(set(labels)) + ["all"]:
        idx = [i for i, lab in enumerate(labels) if g in ("all", lab)]
        arms = {m: v[:, idx].mean(axis=1) for m, v in per.items()}
        out.append({"group": g, "n_users": len(idx), "seeds": seeds,
                    "methods": {m: statistics.describe(a) for m, a in arms.items()},
                    "verdict": statistics.verdict(arms)})
    return out


def _ci(d: dict) -> str:
    return f"{d['mean']:.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]" if d.get("ci95") else f"{d['mean']:.2f}"


def _pair(p: dict) -> str:
    ci = p["ci95"]
    mark = "" if p["beats"] is None else f" **{p['beats']}**"  # the arm whose interval says it is lower
    return f"{p['diff']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]{mark}" if ci else f"{p['diff']:+.2f}"


def markdown(rows: list[dict], manifest: dict) -> list[str]:
    methods = list(rows[0]["methods"])
    pairs = [(p["a"], p["b"]) for p in rows[0]["verdict"]["pairs"]]
    lines = ["| group | language | domain | users | median tokens | " + " | ".join(methods) + " | "
             + " | ".join(f"{a} − {b}" for a, b in pairs) + " | winner or tie |",
             "|---|---|---|---|---|" + "---|" * (len(methods) + len(pairs)) + "---|"]
    users = manifest.get("users", {})
    for r in rows:
        lang, dom = GROUPS.get(r["group"], ("all", "all") if r["group"] == "all" else ("?", "?"))
        toks = [v["tokens"] for v in users.values() if r["group"] in ("all", v.get("group"))]
        v = r["verdict"]
        lines.append(f"| {r['group']} | {lang} | {dom} | {r['n_users']} | {int(np.median(toks)) if toks else '—'} | "
                     + " | ".join(_ci(r["methods"][m]) for m in methods) + " | "
                     + " | ".join(_pair(p) for p in v["pairs"]) + " | "
                     + (v["winner"] or "tie: " + ", ".join(v["tied"])) + " |")
    return lines


def figure(path: str, rows: list[dict]) -> None:
    """Per group, every pair's paired difference of the mean test perplexity with its 95 % interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(p["a"], p["b"]) for p in rows[0]["verdict"]["pairs"]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.6))
    w = 0.8 / len(pairs)
    for k, (a, b) in enumerate(pairs):
        ps = [next(p for p in r["verdict"]["pairs"] if (p["a"], p["b"]) == (a, b)) for r in rows]
        x = np.arange(len(rows)) + (k - (len(pairs) - 1) / 2) * w
        d = np.array([p["diff"] for p in ps])
        lo = np.array([p["ci95"][0] if p["ci95"] else p["diff"] for p in ps])
        hi = np.array([p["ci95"][1] if p["ci95"] else p["diff"] for p in ps])
        ax.bar(x, d, w, label=f"{a} − {b}", yerr=[d - lo, hi - d], capsize=2)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(rows)), [f"{r['group']}\n({r['n_users']})" for r in rows], fontsize=7)
    ax.set_ylabel("A − B of test ppl, paired by seed\n(95 % CI; > 0: B is lower)", fontsize=8)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def distributions(study_dir: str) -> list[dict]:
    """Each run's final quantiles of per-user test perplexity (results.json's test_ppl_distribution),
    with the path of its histogram: [{run, p10, p50, p90, worst10_mean, histogram}]."""
    import glob
    out = []
    for path in sorted(glob.glob(os.path.join(study_dir, "cells", "*", "*", "results.json"))):
        res = json.load(open(path))
        q = (res.get("test_ppl_distribution") or {}).get("final")
        if q:
            run = os.path.basename(os.path.dirname(path))
            hist = os.path.join(os.path.dirname(path), "test_ppl_histogram.png")
            out.append({"run": run, **{k: q[k] for k in ("p10", "p50", "p90", "worst10_mean") if k in q},
                        "histogram": hist if os.path.exists(hist) else None})
    return out


def run_config(study_dir: str) -> dict | None:
    """The resolved config of the study's first run (its config.json), or None."""
    import glob
    for path in sorted(glob.glob(os.path.join(study_dir, "cells", "*", "*", "config.json"))):
        try:
            return json.load(open(path))["config"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def _load(path: str) -> str:
    """The mean of the 1-minute load averages logged in `path` (lines of /proc/loadavg), or ''."""
    try:
        vals = [float(line.split()[0]) for line in open(path) if line.strip()]
    except (OSError, ValueError, IndexError):
        return ""
    return f"{np.mean(vals):.1f} (min {min(vals):.1f}, max {max(vals):.1f}, {len(vals)} samples)" if vals else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, help="the study folder (study.json, study.md)")
    ap.add_argument("--corpus", default="data/many_users", help="the population folder (manifest.json)")
    ap.add_argument("--out", default="", help="the markdown report (default <study>/groups.md)")
    ap.add_argument("--assets", default="", help="folder for study.md/json, groups.json and figures (default <study>)")
    args = ap.parse_args(argv)
    try:
        study = json.load(open(os.path.join(args.study, "study.json")))
        manifest = json.load(open(os.path.join(args.corpus, "manifest.json"), encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cell = study["cells"][0]
    rows = group_table(cell, user_groups(args.corpus))
    assets = args.assets or args.study
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, "groups.json"), "w") as f:
        json.dump({"cell": cell["name"], "statistics": statistics.__doc__.strip().splitlines()[0], "groups": rows}, f,
                  indent=1)
    figure(os.path.join(assets, "groups.png"), rows)
    for name in ("study.md", "study.json", "study.png"):
        if os.path.exists(os.path.join(args.study, name)) and os.path.abspath(assets) != os.path.abspath(args.study):
            shutil.copy(os.path.join(args.study, name), os.path.join(assets, name))
    dists = distributions(args.study)
    for d in dists:  # each run's histogram beside the report
        if d["histogram"]:
            shutil.copy(d["histogram"], os.path.join(assets, f"{d['run']}_test_ppl_histogram.png"))
    out = args.out or os.path.join(args.study, "groups.md")
    try:  # the wrapper's record of the whole command (docs/many_users.md: how it was run)
        timing = json.load(open(os.path.join(args.study, "timing.json")))
    except (OSError, ValueError):
        timing = {}
    text = render(study, cell, rows, manifest, _load(os.path.join(args.study, "loadavg.txt")), timing,
                  os.path.relpath(assets, os.path.dirname(os.path.abspath(out)) or "."), dists, run_config(args.study))
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {out} and {assets}/groups.json, groups.png")
    return 0


def schedule(cfg: dict) -> list[str]:
    """One line of what was run, from a run's config.json."""
    t, f, p, d = cfg["train"], cfg["federation"], cfg["pretrain"], cfg["data"]
    return ["", f"Run: methods {cfg['methods']}, seeds {cfg['seeds']} (stack_seeds={f['stack_seeds']}); "
            f"{d['n_users']} users, participation {f['participation']}, user_chunk {t['user_chunk']}; "
            f"{t['rounds']} rounds x {t['local_steps']} local steps of {t['batch_size']} x {t['seq_len']} tokens, "
            f"lr {t['lr']}, router {t['router_steps']} step(s) every {t['router_every']}; rank {cfg['model']['rank']}; "
            f"split caps {d['train_tokens']} / {d['valid_tokens']} / {d['test_tokens']} tokens; base: a "
            f"{p['n_layer']}-layer, {p['n_embd']}-wide GPT-2 pretrained {p['steps']} steps on {p['text']}."]


def render(study: dict, cell: dict, rows: list[dict], manifest: dict, load: str, timing: dict, rel: str,
           dists: list[dict] = (), cfg: dict | None = None) -> str:
    pop = manifest.get("population", {})
    wall = cell.get("wall_s") or cell.get("one_program_wall_s")
    head = [f"# {study['study']}: {study['description']}", "",
            "Generated by `experiments/many_users_report.py` from the study's `study.json` and the population's "
            "`manifest.json`; do not edit.", "",
            f"Population: {len(manifest.get('users', {}))} users (floor {pop.get('min_tokens')} tokens, a "
            f"{pop.get('vocab')}-token byte-level BPE), {pop.get('heldout_units')} units held out for the base "
            f"(of {pop.get('units')}); seeds {', '.join(map(str, rows[0]['seeds']))}."]
    if timing.get("wall_s"):
        head.append(f"Wall time of `{timing['command']}`: {timing['wall_s'] / 60:.1f} min on {timing.get('cpus', '?')} "
                    f"CPU cores ({timing['started']} to {timing['ended']}, exit code {timing.get('exit')})"
                    + (f"; the machine's 1-minute load average during it {load}." if load else "."))
    elif wall:
        head.append(f"Wall time of the cell: {wall:.0f} s" + (f"; load average during it {load}." if load else "."))
    toks = np.array([v["tokens"] for v in manifest.get("users", {}).values()], np.float64)
    if len(toks):
        head.append(f"Users' sizes in tokens (all their text, before the split caps): p10 {np.quantile(toks, 0.1):,.0f}, "
                    f"median {np.median(toks):,.0f}, p90 {np.quantile(toks, 0.9):,.0f}, largest {toks.max():,.0f}.")
    head += schedule(cfg) if cfg else []
    head += ["", "Reproduce (docs/data.md: the population; README: the set-up):", "", "```bash",
             "python -m experiments.prepare_local_corpus --many-users --out data/many_users",
             "python -m experiments.study --config=configs/studies/many_users.py --workdir=runs/study_many_users",
             "python -m experiments.many_users_report --study=runs/study_many_users --corpus=data/many_users \\",
             "    --out=docs/many_users.md --assets=docs/many_users", "```"]
    head += ["", "## Per language / domain group", "",
             "Mean over the group's users of the test perplexity, per seed; the 95 % Student t interval over "
             "seeds; the differences A − B paired by seed, with the 95 % interval; a name in bold beats the other "
             "(its interval excludes 0), none: no detectable difference. Seeds change the initialisation, the "
             "batches and the participating users; the users and their data are the same in every seed.", ""]
    head += markdown(rows, manifest)
    head += ["", f"![paired differences per group]({rel}/groups.png)", ""]
    if dists:
        head += ["## Per-user distribution of each run", "",
                 "Final test perplexity over the users (results.json's test_ppl_distribution): p10, p50, p90 and "
                 "the mean of the worst 10 % of users.", "", "| run | p10 | p50 | p90 | worst 10 % mean | histogram |",
                 "|---|---|---|---|---|---|"]
        head += [f"| {d['run']} | {d['p10']:.2f} | {d['p50']:.2f} | {d['p90']:.2f} | {d['worst10_mean']:.2f} | "
                 + (f"[png]({rel}/{d['run']}_test_ppl_histogram.png)" if d["histogram"] else "—") + " |" for d in dists]
        head.append("")
    head += [
             f"The study's own report (every method's numbers, findings) is [study.md]({rel}/study.md); "
             f"each run's per-user quantiles and histogram are in its results.md and test_ppl_histogram.png.", ""]
    return "\n".join(head)


if __name__ == "__main__":
    sys.exit(main())
