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
A study that compares (several methods in a cell, or several cells) needs at least 2 seeds per
cell: fewer is one line too. Outputs (comigs_jax.experiment.study_report): WORKDIR/study.json, study.md
(per cell and method n_seeds, mean, sample std and 95 % Student t interval over seeds, per user and
overall; methods compared paired by seed, a winner or a tie per cell; the generated findings), study.png.
"""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
import time

from ml_collections import ConfigDict

from comigs_jax import cli, configuration
from comigs_jax.errors import ConfigError, WorkdirError, first_line
from comigs_jax.experiment import study_report
from comigs_jax.experiment.identity import ADDED_KEYS, first_difference, flat_config

STUDY_KEYS = ("name", "description", "grid", "figure", "one_program", "unavailable", "tune", "per_user_findings")
FIGURES = ("lines", "win_map", "ppl_vs_communication")
IDENTITY_FILE = "study_identity.json"
# Keys that do not make another study (how it runs and writes, not what it computes).
FREE_KEYS = ("resume", "output", "checkpoint", "methods", "seeds", "federation.mode", "federation.shard",
             "federation.stack_seeds", "distributed", "data.cache_dir", "data.use_cache", "data.progress",
             "model.remat", "model.head_block", "train.user_chunk", "eval.zero_shot", "study.grid",
             "study.description", "study.figure", "study.unavailable", "study.one_program", "study.tune",
             "study.per_user_findings")


class StudyError(ConfigError):
    """A study that cannot be run: bad grid, a value the config rejects, another study's folder."""


def default_study_group(name: str = "study") -> ConfigDict:
    s = ConfigDict()
    s.name = name  # the study's name (its identity: a folder holding another study's cells is refused)
    s.description = ""  # one line for study.md
    s.grid = ""  # axes 'KEY=V1|V2; K1&K2=A1&B1|A2&B2' (linked keys change together; 'x0.1' scales a numeric key)
    s.figure = "lines"  # lines (mean ppl per cell and method) | win_map (rows: the first axis, columns: the others; the winner or tie per cell) | ppl_vs_communication
    s.tune = ""  # a grid key on an axis of its own (e.g. train.lr): each method compared at its own best value of it (lowest mean test ppl over seeds) in every combination of the other axes
    s.per_user_findings = False  # True: study.md's findings also give every pair's paired difference per user
    s.one_program = False  # True: cells that differ only in seed(s), train.lr/router_lr/lb_weight/weight_decay/prune_lambda/prox_mu, server.lr train as ONE program per method (every cell x seed a federation)
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
    if st.tune:
        home = [keys for keys, _ in axes if st.tune in keys]
        if not home or len(home[0]) > 1:
            raise StudyError(f"config.study.tune={st.tune!r} is not allowed: the key of a grid axis of its own (not "
                             f"linked with '&'); the grid's keys: {', '.join(k for keys, _ in axes for k in keys) or 'none'}")
    n_map = len(axes) - bool(st.tune)
    if st.figure == "win_map" and n_map < 2:
        raise StudyError(f"config.study.figure='win_map' is not allowed with {n_map} grid axes besides study.tune: "
                         "at least 2 (rows: the first, columns: the others)")
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
    check_seeds(cells)
    return cells


def check_seeds(cells: list[dict]) -> None:
    """StudyError (one line) when a study that compares (several methods in a cell, or several
    cells) has a cell with fewer than 2 seeds: its comparisons are paired by seed, and one seed
    gives no interval."""
    if len(cells) < 2 and len(configuration.methods_of(cells[0]["config"])) < 2:
        return
    for c in cells:
        seeds = configuration.seeds_of(c["config"])
        if len(set(seeds)) < 2:
            raise StudyError(f"config.seeds={c['config'].seeds!r} is not allowed in a study that compares methods "
                             f"or cells (cell {c['name']} runs seed {','.join(map(str, sorted(set(seeds))))}): at least 2, paired by "
                             "seed, for a 95 % interval; 5 or more to detect small differences (--config.seeds=0,1,2,3,4)")


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
    stored = {**{k: v for k, v in ADDED_KEYS.items() if k in identity["config"]}, **old.get("config", {})}
    diff = first_difference(stored, identity["config"])
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
    train.lr / router_lr / lb_weight / weight_decay / prune_lambda / prox_mu, server.lr), in the grid's order."""
    groups = {}
    for c in cells:
        rest = {k: v for k, v in flat_config(c["config"]).items() if k not in configuration.FEDERATION_KEYS}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(c)
    return list(groups.values())


def earlier_timings(workdir: str) -> dict:
    """{cell: wall seconds} of an earlier study.json in `workdir` (a finished cell keeps its time)."""
    try:
        with open(os.path.join(workdir, "study.json")) as f:
            return {c["name"]: c["wall_s"] for c in json.load(f)["cells"] if "wall_s" in c}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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
    results, timings, pending = {}, earlier_timings(workdir), []
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
    summary = study_report.summarise(cfg, cells, results, unavailable, timings)
    if one_program_s is not None:
        summary["one_program_wall_s"] = round(one_program_s, 1)  # every pending cell, all its programs
    study_report.write_outputs(workdir, summary, cfg)
    log(f"[study {cfg.study.name}] outputs in {os.path.abspath(workdir)}: study.json, study.md, study.png")
    return summary
