"""What every command line of the project shares: `--config=FILE[:ARG]` with `--config.key=value`
overrides (ml_collections, locked, so a mistyped key fails), and errors as one line.

    cfg, flag_values = cli.parse_config(argv, "configs/demo.py", homes=cli.EXPERIMENT_HOMES, define=...)
    code = cli.main_guard(lambda: ...)        # a typed error -> "error: ..." on stderr, exit code

`experiments.run`, `experiments.bench` and `comigs_jax.capacity` parse with it, each on a fresh
FlagValues, so their `main(argv)` can be called in-process (tests, notebooks) and returns an exit
code instead of ending the interpreter.
"""
from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import shlex
import sys
from typing import Callable

from absl import flags
from ml_collections import ConfigDict, config_flags

from comigs_jax.errors import ExperimentError, Stopped, first_line

# The folder that holds the packages comigs_jax, configs and experiments: a checkout's root, or the
# site-packages of an installed wheel (configs/ and experiments/ are packaged with comigs_jax). A
# relative --config path that is not found from the working directory is looked up here, so
# `comigs-run --config=configs/tiny.py` runs the shipped config from any directory.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = ROOT  # the name before packaging (a checkout was assumed); kept for callers
# Where the keys of each group of the experiment configs are defined ("" = every other group).
EXPERIMENT_HOMES = {"": "configs/base.py", "data": "comigs_jax/data/config.py"}
# OSErrors that are the machine's or the user's, not the code's: one line, no traceback.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                      errno.EISDIR, errno.EEXIST, errno.ENOENT}


class UsageError(Exception):
    """A command line that cannot be run: a missing config file, an unknown key, a bad value."""


class HelpRequested(Exception):
    """--help / -h: the text to print (exit code 0)."""


class CleanStop(SystemExit):
    """A stop every process agreed on (a signal), after a checkpoint: the normal exit path."""


def config_spec(argv, default: str) -> str:
    """The --config value as typed (FILE[:ARG]), or `default`."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def load_config_file(spec: str) -> ConfigDict:
    """get_config([ARG]) of FILE, as config_flags calls it (no overrides)."""
    path, _, arg = spec.partition(":")
    name = "_comigs_config_file"
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        loader.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    finally:
        sys.modules.pop(name, None)


def _override_keys(argv) -> list[tuple[str, str]]:
    """(flag as typed, dotted key) of every --config.KEY override."""
    out = []
    for a in argv:
        for prefix in ("--config.", "--noconfig."):
            if a.startswith(prefix):
                out.append((a.split("=", 1)[0], a[len(prefix):].split("=", 1)[0]))
    return out


def unknown_key(cfg: ConfigDict, key: str, homes: dict) -> str | None:
    """None when `key` (dotted) is in cfg; else the one-line reason: the key, a near miss, and the
    file that defines the keys of its group."""
    node, path = cfg, []
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            group = ".".join(path)
            close = difflib.get_close_matches(part, list(node.keys()) if isinstance(node, ConfigDict) else [], 1)
            hint = f"did you mean '{'.'.join(path + close)}'? " if close else ""
            home = next((homes[g] for g in sorted(homes, key=len, reverse=True)
                         if g and (group == g or group.startswith(g + "."))), homes.get("", "the config file"))
            where = f"the keys of '{group}' are defined in {home}" if group else f"the top-level keys are defined in {home}"
            return f"unknown config key '{key}' ({hint}{where})"
        node = node[part]
        path.append(part)
    return None


def key_comments(files) -> dict[str, str]:
    """{dotted key: comment} of the `x.KEY = value  # comment` lines of config files; `files` is
    [(key prefix, path)], later files winning (a config file's comment over its base's)."""
    import io
    import re
    import tokenize
    target = re.compile(r"^\s*[A-Za-z_]\w*\.([A-Za-z_][\w.]*)\s*=(?!=)")
    out = {}
    for prefix, path in files:
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
        except OSError:
            continue
        lines = src.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type != tokenize.COMMENT:
                continue
            row, col = tok.start
            m = target.match(lines[row - 1][:col])
            if m:
                out[prefix + m.group(1)] = tok.string.lstrip("#").strip()
    return out


def config_help(cfg: ConfigDict, comments: dict) -> str:
    """Every leaf key of `cfg` as `key = value  # comment`, in the config's order. A key without a
    comment of its own takes the comment of its longest suffix that has one (a bench workload's
    `tiny.train.lr` is configs/base.py's `train.lr`)."""
    lines = []

    def walk(node, prefix):
        for k, v in node.items():
            key = prefix + k
            if isinstance(v, ConfigDict):
                walk(v, key + ".")
                continue
            parts = key.split(".")
            note = next((comments[".".join(parts[i:])] for i in range(len(parts)) if ".".join(parts[i:]) in comments), "")
            lines.append(f"{key} = {v!r}" + (f"  # {note}" if note else ""))
    walk(cfg, "")
    return "\n".join(lines)


def parse_config(argv, default: str, *, homes: dict, define: Callable | None = None, doc: str = ""):
    """(config, FlagValues) from argv (argv[0] is the program). UsageError (one line) for a missing
    config file, an unknown key or a value the flag parser refuses; HelpRequested for --help, and
    for --config_help with every key of the config (overrides applied), its value and its comment.
    `define(flag_values)` adds the command's other flags; `doc` is the command's help text."""
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        fv = flags.FlagValues()
        if define is not None:
            define(fv)
        others = "".join(f"  --{name}: {fv[name].help}\n" for name in fv)
        home = ", ".join(f"{g + '.*' if g else 'other keys'}: {f}" for g, f in sorted(homes.items(), reverse=True))
        raise HelpRequested(f"{doc.strip()}\n\nFlags:\n  --config=FILE[:ARG]: the config file (default {os.path.relpath(default, ROOT)})\n"
                            f"  --config.KEY=VALUE: override any key of it (defaults, one comment each: {home})\n"
                            f"  --config_help: list every key of the config with its value and comment\n"
                            f"{others}")
    show_keys = "--config_help" in argv[1:]
    argv = [a for a in argv if a != "--config_help"]
    argv = resolve_config_arg(argv)
    spec = config_spec(argv[1:], default)
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} not found (relative paths are tried from the working directory, "
                         f"then from {ROOT}; the shipped configs are configs/*.py there)")
    overrides = _override_keys(argv[1:])
    if overrides:
        try:
            plain = load_config_file(spec)
        except Exception as e:  # noqa: BLE001 - a broken config file: its own error, one line
            raise UsageError(f"config file {spec!r} cannot be loaded: {first_line(e)}") from None
        for flag, key in overrides:
            why = unknown_key(plain, key, homes)
            if why:
                raise UsageError(f"{flag}: {why}")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default, "Config file[:argument].", flag_values=fv, lock_config=True,
                                   sys_argv=list(argv))
    if define is not None:
        define(fv)
    try:
        fv(list(argv))
        cfg = fv.config  # loads the file and applies the --config.* overrides
    except (flags.Error, ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        raise UsageError(first_line(e)) from None
    if show_keys:  # comments: the data keys' file (rooted at `data`), configs/base.py, the homes, the
        # config files the config file imports, the config file
        files = [EXPERIMENT_HOMES["data"], EXPERIMENT_HOMES[""], *homes.values(), *_imported_configs(path)]
        files = [("data." if f == EXPERIMENT_HOMES["data"] else "", os.path.join(ROOT, f)) for f in dict.fromkeys(files)]
        raise HelpRequested(config_help(cfg, key_comments(files + [("", path)])))
    return cfg, fv


def config_path(path: str) -> str:
    """`path` if it is a file; else, for a relative path, the same path under ROOT when that is a
    file (the shipped configs of an installed package); else `path` unchanged."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    packaged = os.path.join(ROOT, path)
    return packaged if os.path.isfile(packaged) else path


def resolve_config_arg(argv) -> list:
    """argv with its --config=FILE[:ARG] value's FILE resolved by `config_path`."""
    out = list(argv)
    for i, a in enumerate(out[1:], 1):
        if a.startswith("--config="):
            path, sep, arg = a.split("=", 1)[1].partition(":")
            out[i] = f"--config={config_path(path)}{sep}{arg}"
        elif a == "--config" and i + 1 < len(out):
            path, sep, arg = out[i + 1].partition(":")
            out[i + 1] = config_path(path) + sep + arg
    return out


def _imported_configs(path: str) -> list[str]:
    """configs/X.py of every `from configs import X` / `from configs.X import ...` in a config file."""
    import ast
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "configs":
            out += [f"configs/{a.name}.py" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("configs."):
            out.append(node.module.replace(".", "/") + ".py")
    return out


def parse_flags(fv: flags.FlagValues, argv, doc: str = "") -> flags.FlagValues:
    """argv parsed into absl flags `fv` (the commands without a config: export, generate); a bad
    flag is SystemExit with one `error:` line; --help is HelpRequested with `doc` and the flags."""
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        raise HelpRequested(f"{doc.strip()}\n\nFlags:\n" + "".join(f"  --{n}: {fv[n].help}\n" for n in fv))
    try:
        fv(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {first_line(e)}") from None
    return fv


def resume_command(module: str, argv) -> str:
    """The command line that resumes a run (without a --config.resume=False): `python -m module
    ...`, or the console script's name when the run was started by one (comigs-run ...)."""
    args = [a for a in argv[1:] if not a.startswith("--config.resume")]
    program = os.path.basename(str(argv[0])) if argv else ""
    head = [program] if program.startswith("comigs-") else ["python", "-m", module]
    return " ".join([*head, *map(shlex.quote, args)])


def as_exit(fn: Callable, resume: str | None = None):
    """fn(), with the library's typed errors turned into SystemExit("error: ...") (one line) and a
    signal stop into CleanStop(128 + signum) after printing where it stopped and how to resume."""
    try:
        return fn()
    except Stopped as e:
        if _is_main_process():
            print(f"{e}; resume with: {resume}" if resume else str(e), flush=True)
        raise CleanStop(e.exit_code) from None
    except (ExperimentError, UsageError) as e:
        raise SystemExit(f"error: {first_line(e)}") from None
    except OSError as e:
        if e.errno in ENVIRONMENT_ERRNOS:
            raise SystemExit(f"error: {e.strerror or type(e).__name__}: {e.filename or ''}".rstrip(": ")) from None
        raise


def main_guard(fn: Callable) -> int:
    """Run a command's body; its exit code (SystemExit's message printed on stderr, one line)."""
    try:
        out = as_exit(fn)
    except HelpRequested as e:
        print(e, flush=True)
        return 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
            return 1
        return int(e.code or 0)
    return int(out or 0)


def _is_main_process() -> bool:
    if "jax" not in sys.modules:
        return True
    return sys.modules["jax"].process_index() == 0


def install_process_hooks() -> None:
    """For a command's own process: `kill -USR1 <pid>` prints every thread's Python stack (to see
    where a stalled multi-process run waits), and the 'Event loop is closed' reports of the
    tensorstore reads orbax abandons after an unreadable checkpoint are dropped (dozens of
    tracebacks around the run's one error line), as are asyncio's 'Task exception was never
    retrieved' reports of the same reads; every other unraisable exception is reported."""
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    default = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        default(u)

    sys.unraisablehook = hook
    # The same abandoned reads may end as asyncio tasks whose exception nobody retrieves; asyncio
    # logs each with its traceback. This project runs no asyncio code of its own.
    import logging
    logging.getLogger("asyncio").addFilter(
        lambda record: not str(record.msg).startswith("Task exception was never retrieved"))
