"""Studies: a grid over config keys, each cell an experiment.run of the config's methods x seeds.

    from comigs_jax.experiment import study
    summary = study.run_study(cfg, "runs/studies/generalists")   # cfg: a configs/studies/*.py config

A study config is an experiment config (every key of configs/base.py, so `--config.data.*` points
it at real data) with one more group, `study` (STUDY_KEYS below):

    study.grid = "model.n_generalists&model.n_experts=0&1|1&2|2&3|3&4; seeds=0,1"

Axes are separated by ';'; an axis is KEY=V1|V2|... (values separated by '|'), or linked keys
K1&K2=A1&B1|A2&B2 that change together. A value is taken as the config field's type; 'x0.1' on a
numeric key scales the config's own value (int keys rounded): data.valid_tokens=x1|x0.1|x0.01.
The grid is the cartesian product of the axes; each cell runs the config's `methods` x `seeds` in
WORKDIR/cells/<key=value__...>/ (experiment.run's layout, resumable), seeds as one program when
federation.stack_seeds. With study.one_program, the cells that differ only in seeds and the
per-row hyper-parameters (configuration.FEDERATION_KEYS: train.lr, ...) train together, every
cell x seed a federation of one program per method (experiment.loop.run_cells): a grid over
model.n_generalists x train.lr is one program per n_generalists. A cell whose every run has
results.json is finished and not rerun.

Before any run every cell's config is built and validated: an unknown grid key, a value the
config rejects is one line (StudyError) naming the key and what is allowed. WORKDIR/study_identity.json names
the study and its base config; a folder holding another study (or anything else) is refused.
Outputs: WORKDIR/study.json, study.md (mean ± std over seeds, per user and overall, np.std with
ddof=0 as experiment.run's comparison), study.png.
"""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
import time

import numpy as np
from ml_collections import ConfigDict

from comigs_jax import cli, configuration
from comigs_jax.errors import ConfigError, WorkdirError, first_line
from comigs_jax.experiment.identity import first_difference, flat_config

STUDY_KEYS = ("name", "description", "grid", "figure", "one_program", "unavailable")
FIGURES = ("lines", "win_map", "ppl_vs_communication")
IDENTITY_FILE = "study_identity.json"
# Keys that do not make another study (how it runs and writes, not what it computes).
FREE_KEYS = ("resume", "output", "checkpoint", "methods", "seeds", "federation.mode", "federation.shard",
             "federation.stack_seeds", "distributed", "data.cache_dir", "data.use_cache", "data.progress",
             "model.remat", "model.head_block", "train.user_chunk", "eval.zero_shot", "study.grid",
             "study.description", "study.figure", "study.unavailable", "study.one_program")


class StudyError(ConfigError):
    """A study that cannot be run: bad grid, a value the config rejects, another study's folder."""


def default_study_group(name: str = "study") -> ConfigDict:
    s = ConfigDict()
    s.name = name  # the study's name (its identity: a folder holding another study's cells is refused)
    s.description = ""  # one line for study.md
    s.grid = ""  # axes 'KEY=V1|V2; K1&K2=A1&B1|A2&B2' (linked keys change together; 'x0.1' scales a numeric key)
    s.figure = "lines"  # lines (mean ppl per cell and method) | win_map (two axes: the best method per cell) | ppl_vs_communication
    s.one_program = False  # True: cells that differ only in seed(s), train.lr/router_lr/lb_weight/weight_decay/prune_lambda train as ONE program per method (every cell x seed a federation)
    s.unavailable = ""  # cells the engine cannot run yet: 'AXIS VALUE: why; ...' listed in study.md, not run
    return s


# ----------------------------------------------------------------------------- grid
def parse_grid(spec: str) -> list[tuple[tuple[str, ...], list[tuple[str, ...]]]]:
    """[(keys, [values-tuple as typed, ...]), ...] of a grid spec; StudyError on a malformed axis."""
    axes = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        if "=" not in part:
            raise StudyError(f"study.grid axis {part!r} is not allowed: KEY=V1|V2|... or K1&K2=A1&B1|A2&B2")
        lhs, rhs = part.split("=", 1)
        keys = tuple(k.strip() for k in lhs.split("&"))
        if not all(keys) or len(set(keys)) != len(keys):
            raise StudyError(f"study.grid axis {part!r} is not allowed: distinct non-empty keys joined by '&'")
        values = []
        for v in rhs.split("|"):
            vals = tuple(x.strip() for x in v.split("&")) if len(keys) > 1 else (v.strip(),)
            if len(vals) != len(keys) or any(x == "" for x in vals):
                raise StudyError(f"study.grid axis {lhs.strip()}: value {v.strip()!r} is not allowed: "
                                 f"{len(keys)} non-empty value(s) joined by '&', values separated by '|'")
            values.append(vals)
        if len(set(values)) != len(values):
            raise StudyError(f"study.grid axis {lhs.strip()}: a value is listed twice; each value once")
        axes.append((keys, values))
    seen = [k for keys, _ in axes for k in keys]
    for k in seen:
        if seen.count(k) > 1:
            raise StudyError(f"study.grid key {k!r} is on two axes; each key on one axis (link keys with '&')")
        if k == "study" or k.startswith("study."):
            raise StudyError(f"study.grid key {k!r} is not allowed: a key of the experiment config, not of study.*")
    return axes


def _lookup(cfg: ConfigDict, key: str):
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def coerce(cfg: ConfigDict, key: str, text: str):
    """The grid value `text` as the type of cfg's field `key`; StudyError naming what is allowed."""
    old = _lookup(cfg, key)
    if isinstance(old, ConfigDict):
        raise StudyError(f"study.grid key {key!r} is a group, not a value; allowed: one of its keys "
                         f"({', '.join(f'{key}.{k}' for k in old.keys())})")
    kind = type(old)
    bad = lambda what: StudyError(f"study.grid {key}={text!r} is not allowed: {what} (the config's "
                                  f"{key} is {old!r})")
    if kind in (int, float) and not isinstance(old, bool) and re.fullmatch(r"x[0-9.eE+-]+", text):
        try:
            factor = float(text[1:])
        except ValueError:
            raise bad("a number or x<factor> of the config's value") from None
        return int(round(old * factor)) if kind is int else old * factor
    if kind is str:
        return text
    try:
        lit = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lit = text
    if isinstance(old, bool):
        if isinstance(lit, bool):
            return lit
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise bad("True or False")
    if kind is int:
        if isinstance(lit, int) and not isinstance(lit, bool):
            return lit
        raise bad("an integer (or x<factor> of the config's value)")
    if kind is float:
        if isinstance(lit, (int, float)) and not isinstance(lit, bool):
            return float(lit)
        raise bad("a number (or x<factor> of the config's value)")
    return lit


def cell_name(values: dict) -> str:
    """The cell's folder name: key=value pairs (the key's last part when unambiguous) joined by '__'."""
    lasts = [k.split(".")[-1] for k in values]
    parts = []
    for k, v in values.items():
        short = k.split(".")[-1] if lasts.count(k.split(".")[-1]) == 1 else k
        parts.append(f"{short}={v}")
    name = "__".join(parts) or "all"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "-", name)


def strip_study(cfg: ConfigDict) -> ConfigDict:
    """The experiment config of a study config (without its `study` group), unlocked copy."""
    out = ConfigDict({k: v for k, v in cfg.copy_and_resolve_references().items() if k != "study"})
    return out


def expand(cfg: ConfigDict) -> list[dict]:
    """Every cell of the study config `cfg`, validated: [{name, values (as typed), config}]. Raises
    StudyError (one line) before any run for an unknown key or a value the config rejects."""
    st = cfg.get("study")
    if st is None:
        raise StudyError("the config has no `study` group; use a configs/studies/*.py config")
    for k in st.keys():
        if k not in STUDY_KEYS:
            raise StudyError(f"config.study.{k} is not a study key; allowed: {', '.join(STUDY_KEYS)}")
    if not st.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", st.name):
        raise StudyError(f"config.study.name={st.name!r} is not allowed: a name of letters, digits, '_', '.', '-'")
    if st.figure not in FIGURES:
        raise StudyError(f"config.study.figure={st.figure!r} is not allowed: one of {', '.join(FIGURES)}")
    base = strip_study(cfg)
    axes = parse_grid(st.grid)
    for keys, _ in axes:
        for k in keys:
            why = cli.unknown_key(base, k, cli.EXPERIMENT_HOMES)
            if why:
                raise StudyError(f"study.grid: {why}")
    if st.figure == "win_map" and len(axes) != 2:
        raise StudyError(f"config.study.figure='win_map' is not allowed with {len(axes)} grid axes: exactly 2")
    try:
        configuration.validate(base)
    except ConfigError as e:
        raise StudyError(f"the study's base config: {e}") from None
    cells = []
    for combo in itertools.product(*[values for _, values in axes]):
        typed, shown = {}, {}
        cell = base.copy_and_resolve_references()
        for (keys, _), vals in zip(axes, combo):
            for k, text in zip(keys, vals):
                v = coerce(base, k, text)
                try:
                    cell.update_from_flattened_dict({k: v})
                except (TypeError, ValueError, KeyError, AttributeError) as e:
                    raise StudyError(f"study.grid {k}={text!r} is not allowed: {first_line(e)}") from None
                typed[k], shown[k] = v, text
        name = cell_name(shown)
        try:
            configuration.validate(cell)
        except ConfigError as e:
            raise StudyError(f"study.grid cell {name}: {e}") from None
        cells.append({"name": name, "values": typed, "shown": shown, "config": cell})
    names = [c["name"] for c in cells]
    if len(set(names)) != len(names):
        raise StudyError("study.grid: two cells get the same folder name; use distinct values")
    return cells


def unavailable_of(cfg) -> list[dict]:
    """[{"cell": ..., "why": ...}] of study.unavailable ('CELL: why; ...')."""
    out = []
    for part in (p.strip() for p in cfg.study.unavailable.split(";")):
        if part:
            cell, _, why = part.partition(":")
            out.append({"cell": cell.strip(), "why": why.strip()})
    return out


# ----------------------------------------------------------------------------- identity
def study_identity(cfg) -> dict:
    flat = flat_config(cfg)
    grid_keys = {k for keys, _ in parse_grid(cfg.study.grid) for k in keys}
    keep = {k: v for k, v in flat.items()
            if k not in grid_keys and not any(k == f or k.startswith(f + ".") for f in FREE_KEYS)}
    return {"study": cfg.study.name, "config": keep}


def check_study_dir(workdir: str, identity: dict) -> None:
    """WorkdirError (one line) for a folder holding another study, or something that is no study."""
    path = os.path.join(workdir, IDENTITY_FILE)
    if not os.path.isdir(workdir):
        if os.path.exists(workdir):
            raise WorkdirError(f"study folder {workdir} is not a directory; use another --workdir")
        return
    if not os.path.exists(path):
        if os.listdir(workdir):
            raise WorkdirError(f"{workdir} is not empty and holds no study ({IDENTITY_FILE} missing); "
                               "refusing to write a study there: use another --workdir")
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} cannot be read ({type(e).__name__}); use another --workdir") from None
    if old.get("study") != identity["study"]:
        raise WorkdirError(f"{workdir} holds the cells of another study ({old.get('study')!r}, this is "
                           f"{identity['study']!r}); use another --workdir")
    diff = first_difference(old.get("config", {}), identity["config"])
    if diff:
        raise WorkdirError(f"{workdir} holds study {identity['study']!r} with another config ({diff}); "
                           "use another --workdir")


# ----------------------------------------------------------------------------- running
def run_dirs(cell_dir: str, cell_cfg) -> dict:
    from comigs_jax.experiment.loop import run_dir_of
    methods, seeds = configuration.methods_of(cell_cfg), configuration.seeds_of(cell_cfg)
    n = len(methods) * len(seeds)
    return {(m, s): run_dir_of(cell_dir, m, s, n) for m in methods for s in seeds}


def read_finished(cell_dir: str, cell_cfg) -> dict | None:
    """{(method, seed): results} when every run of the cell has results.json; else None."""
    out = {}
    for key, d in run_dirs(cell_dir, cell_cfg).items():
        try:
            with open(os.path.join(d, "results.json")) as f:
                out[key] = json.load(f)
        except (OSError, ValueError):
            return None
    return out


def program_groups(cells: list[dict]) -> list[list[dict]]:
    """The cells in groups that can train as one program: equal but for FEDERATION_KEYS (seeds,
    train.lr / router_lr / lb_weight / weight_decay / prune_lambda), in the grid's order."""
    groups = {}
    for c in cells:
        rest = {k: v for k, v in flat_config(c["config"]).items() if k not in configuration.FEDERATION_KEYS}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(c)
    return list(groups.values())


def run_study(cfg, workdir: str, log=print, runner=None, cells_runner=None) -> dict:
    """Validate every cell, then run the unfinished ones and write study.json / .md / .png.
    Returns study.json's content. `runner(cell_cfg, cell_dir)` defaults to experiment.run; with
    study.one_program, `cells_runner([(cell_cfg, cell_dir), ...])` (default experiment.loop.run_cells)
    trains each group of unfinished cells that differ only in FEDERATION_KEYS as one program."""
    cells = expand(cfg)  # every bad input: one line before any run
    identity = study_identity(cfg)
    check_study_dir(workdir, identity)
    if runner is None:
        from comigs_jax.experiment.loop import run as runner
    if cells_runner is None:
        from comigs_jax.experiment.loop import run_cells as cells_runner
    os.makedirs(os.path.join(workdir, "cells"), exist_ok=True)
    path = os.path.join(workdir, IDENTITY_FILE)
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            json.dump(identity, f, indent=1)
        os.replace(path + ".tmp", path)
    unavailable = unavailable_of(cfg)
    results, timings, pending = {}, {}, []
    cell_dir = lambda cell: os.path.join(workdir, "cells", cell["name"])
    for i, cell in enumerate(cells):
        done = read_finished(cell_dir(cell), cell["config"])
        if done is not None:
            log(f"[study {cfg.study.name}] cell {i + 1}/{len(cells)} {cell['name']}: finished, not rerun")
            results[cell["name"]] = done
        elif cfg.study.one_program:
            pending.append(cell)
        else:
            log(f"[study {cfg.study.name}] cell {i + 1}/{len(cells)} {cell['name']}")
            t0 = time.perf_counter()
            runner(cell["config"], cell_dir(cell))
            timings[cell["name"]] = time.perf_counter() - t0
            pending.append(cell)
    one_program_s = None
    if cfg.study.one_program and pending:
        t0 = time.perf_counter()
        for group in program_groups(pending):
            log(f"[study {cfg.study.name}] cells {', '.join(c['name'] for c in group)} as one program per method")
            cells_runner([(c["config"], cell_dir(c)) for c in group])
        one_program_s = time.perf_counter() - t0
    for cell in pending:
        done = read_finished(cell_dir(cell), cell["config"])
        if done is None:
            raise WorkdirError(f"cell {cell['name']} finished without every run's results.json in {cell_dir(cell)}")
        results[cell["name"]] = done
    summary = summarise(cfg, cells, results, unavailable, timings)
    if one_program_s is not None:
        summary["one_program_wall_s"] = round(one_program_s, 1)  # every pending cell, all its programs
    write_outputs(workdir, summary, cfg)
    log(f"[study {cfg.study.name}] outputs in {os.path.abspath(workdir)}: study.json, study.md, study.png")
    return summary


# ----------------------------------------------------------------------------- aggregation
def _comm_bytes(res: dict) -> float:
    c = res.get("communication") or {}
    up, down = c.get("upload_bytes_float32"), c.get("download_bytes_float32")
    if up is None or down is None:
        return float("nan")
    return float(np.mean(np.asarray(up, float) + np.asarray(down, float)))


def summarise(cfg, cells: list[dict], results: dict, unavailable: list[dict], timings: dict | None = None) -> dict:
    """study.json's content: per cell and method, per-seed per-user test ppl, their mean and std
    over seeds (np.std, ddof=0), the mean over users per seed and its mean/std, the Bayes floor
    when known, the ratio to it, and the communication (float32 bytes per user, up + down)."""
    out_cells = []
    for cell in cells:
        res = results[cell["name"]]
        methods = configuration.methods_of(cell["config"])
        seeds = configuration.seeds_of(cell["config"])
        entry = {"name": cell["name"], "values": cell["values"], "shown": cell["shown"], "methods": {}}
        for m in methods:
            per_seed = np.asarray([[u["test_ppl"] for u in res[m, s]["users"]] for s in seeds], np.float64)
            user_mean = per_seed.mean(axis=1)
            row = {"seeds": seeds, "per_seed": per_seed.tolist(), "mean": per_seed.mean(0).tolist(),
                   "std": per_seed.std(0).tolist(), "user_mean": float(user_mean.mean()),
                   "user_mean_std": float(user_mean.std()),
                   "communication_bytes_per_user": _comm_bytes(res[m, seeds[0]])}
            users0 = res[m, seeds[0]]["users"]
            if "bayes_ppl" in users0[0]:
                bayes = np.asarray([u["bayes_ppl"] for u in users0], np.float64)
                ratio = per_seed / bayes
                row["bayes_ppl"] = bayes.tolist()
                row["over_bayes"] = float(ratio.mean())
                row["over_bayes_std"] = float(ratio.mean(axis=1).std())
            entry["methods"][m] = row
        entry["users"] = list(res[methods[0], seeds[0]]["data"]["users"])
        best = min(entry["methods"], key=lambda k: entry["methods"][k]["user_mean"])
        entry["best"] = best
        if timings and cell["name"] in timings:
            entry["wall_s"] = round(timings[cell["name"]], 1)
        out_cells.append(entry)
    axes = parse_grid(cfg.study.grid)
    return {"study": cfg.study.name, "description": cfg.study.description, "grid": cfg.study.grid,
            "axes": [{"keys": list(k), "values": [list(v) for v in vals]} for k, vals in axes],
            "methods": configuration.methods_of(strip_study(cfg)) if not any(
                "methods" in k for k, _ in axes) else None,
            "std": "np.std over seeds (ddof=0)", "cells": out_cells, "unavailable": unavailable}


def _pm(m, s):
    return f"{m:.3f} ± {s:.3f}"


def markdown(summary: dict) -> str:
    lines = [f"# Study {summary['study']}", ""]
    if summary["description"]:
        lines += [summary["description"], ""]
    lines += [f"Grid: `{summary['grid']}`. Test perplexity of the local models (mean ± std over seeds, "
              "np.std ddof=0); overall = the mean over users.", ""]
    bayes = any("bayes_ppl" in r for c in summary["cells"] for r in c["methods"].values())
    lines += ["| cell | method | seeds | overall | " + ("/ Bayes floor | " if bayes else "") + "comm. MiB/user | "
              "per user |", "|---|---|---|---|" + ("---|" if bayes else "") + "---|---|"]
    for c in summary["cells"]:
        for m, r in c["methods"].items():
            win = " **best**" if m == c["best"] and len(c["methods"]) > 1 else ""
            users = "; ".join(f"{u}: {_pm(a, b)}" for u, a, b in zip(c["users"], r["mean"], r["std"]))
            lines.append(f"| {c['name']} | {m}{win} | {len(r['seeds'])} | **{_pm(r['user_mean'], r['user_mean_std'])}** | "
                         + (f"{r['over_bayes']:.3f} ± {r['over_bayes_std']:.3f} | " if bayes else "")
                         + f"{r['communication_bytes_per_user'] / 2 ** 20:.3f} | {users} |")
    if bayes:
        lines += ["", "Bayes floor (exact, per user) is listed per cell in study.json (`bayes_ppl`)."]
    if summary["unavailable"]:
        lines += ["", "Not available (not run):", ""]
        lines += [f"- {u['cell']}: {u['why']}" for u in summary["unavailable"]]
    wins = [c for c in summary["cells"] if len(c["methods"]) > 1]
    if wins:
        lines += ["", "Best method per cell (lowest overall mean): "
                  + ", ".join(f"{c['name']}: {c['best']}" for c in wins)]
    return "\n".join(lines) + "\n"


def write_outputs(workdir: str, summary: dict, cfg) -> None:
    for name, text in (("study.json", json.dumps(summary, indent=1)), ("study.md", markdown(summary))):
        tmp = os.path.join(workdir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(workdir, name))
    figure(os.path.join(workdir, "study.png"), summary, cfg.study.figure)


def figure(path: str, summary: dict, kind: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = summary["cells"]
    methods = list(dict.fromkeys(m for c in cells for m in c["methods"]))
    use_bayes = all("over_bayes" in r for c in cells for r in c["methods"].values())
    val = lambda r: r["over_bayes"] if use_bayes else r["user_mean"]
    err = lambda r: r["over_bayes_std"] if use_bayes else r["user_mean_std"]
    ylabel = "test ppl / Bayes floor" if use_bayes else "test ppl (mean over users)"
    if kind == "win_map":
        (ax0, ax1) = summary["axes"]
        rows = ["&".join(v) for v in ax0["values"]]
        cols = ["&".join(v) for v in ax1["values"]]
        grid = np.full((len(rows), len(cols)), -1)
        text = [["" for _ in cols] for _ in rows]
        for c in cells:
            i = rows.index("&".join(_shown(c, k) for k in ax0["keys"]))
            j = cols.index("&".join(_shown(c, k) for k in ax1["keys"]))
            grid[i, j] = methods.index(c["best"])
            r = c["methods"][c["best"]]
            text[i][j] = f"{c['best']}\n{val(r):.3f}"
        fig, ax = plt.subplots(figsize=(1.8 * len(cols) + 2, 1.1 * len(rows) + 1.5))
        cmap = plt.get_cmap("tab10")
        ax.imshow(grid, cmap=matplotlib.colors.ListedColormap([cmap(i) for i in range(len(methods))]),
                  vmin=0, vmax=max(len(methods) - 1, 1), aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("&".join(ax1["keys"]))
        ax.set_ylabel("&".join(ax0["keys"]))
        ax.set_title(f"{summary['study']}: best method per cell ({ylabel})", fontsize=9)
    elif kind == "ppl_vs_communication":
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            pts = [(c["methods"][m]["communication_bytes_per_user"] / 2 ** 20, val(c["methods"][m]),
                    err(c["methods"][m]), c["name"]) for c in cells if m in c["methods"]]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o", label=m)
            for x, y, _, name in pts:
                ax.annotate(name, (x, y), fontsize=6)
        ax.set_xlabel("communication per user (MiB, float32, up + down)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(cells) + 2), 4))
        x = np.arange(len(cells))
        width = 0.8 / max(len(methods), 1)
        for k, m in enumerate(methods):
            xs = [i for i, c in enumerate(cells) if m in c["methods"]]
            ax.bar(x[xs] + k * width, [val(cells[i]["methods"][m]) for i in xs], width,
                   yerr=[err(cells[i]["methods"][m]) for i in xs], label=m)
        ax.set_xticks(x + 0.4 - width / 2, [c["name"] for c in cells], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        lo = min(val(c["methods"][m]) for c in cells for m in c["methods"])
        ax.set_ylim(bottom=lo * 0.97)
        ax.legend(fontsize=7)
    ax.set_title(ax.get_title() or summary["study"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shown(cell: dict, key: str) -> str:
    """The grid value of `key` in `cell` as typed in the grid (recovered from the cell name)."""
    return cell["shown"][key] if "shown" in cell else str(cell["values"][key])
