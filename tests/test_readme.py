"""Every README command runs as written (issue 31 item 7; tests/readme_commands.py extracts them):
each one parses (its config file, keys and flags exist, its values validate where the data are
here), the generate / export examples name a folder and a user that the README's run command
for that workdir writes, and the light chain a new user follows (the demo, generate, export,
comigs-run on the packaged tiny config, capacity, --config_help) runs on a small schedule in an
empty directory, in this process. `python tests/readme_commands.py` also runs the heavy ones."""
import contextlib
import importlib
import io
import os

import pytest

import readme_commands as rc
from comigs_jax import cli, configuration

COMMANDS = rc.commands()
MAINS = {"comigs_jax.capacity": "comigs_jax.capacity.command"}
CONFIG_COMMANDS = ("experiments.run", "experiments.study", "experiments.bench", "experiments.bench_federations",
                   "comigs_jax.capacity")


def _main(argv):
    """(exit code, stdout, stderr) of the command's main(argv) in this process."""
    module = importlib.import_module(MAINS.get(argv[0], argv[0]))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _inner(argv):
    """launch_local's per-process command: [module, args after --]."""
    module = argv[argv.index("--module") + 1] if "--module" in argv else "experiments.run"
    return [module, *argv[argv.index("--") + 1:]]


def test_the_readme_has_the_commands_a_user_runs():
    text = [" ".join(a) for a in COMMANDS]
    for expected in ("experiments.run", "experiments.generate --workdir=runs/demo", "experiments.export",
                     "experiments.launch_local", "comigs_jax.capacity", "experiments.study", "experiments.bench",
                     "experiments.run --config=configs/tiny.py --config.train.rounds=1 --workdir=runs/tiny"):
        assert any(t.startswith(expected) for t in text), expected
    assert len(COMMANDS) >= 18


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:70])
def test_every_command_parses(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative configs are found in the package, as for an installed user
    if argv[0] == "experiments.launch_local":
        argv = _inner(argv)
    if argv[0] in CONFIG_COMMANDS:
        code, out, err = _main([*argv, "--config_help"])  # every key and flag exists; nothing runs
        assert code == 0 and " = " in out, err
        if argv[0] == "experiments.run" and rc.need_of(argv) is None and "--config_help" not in argv:
            configuration.validate(_parse_run(argv)[0])  # the values too, where the data are here
    elif argv[0] in ("experiments.generate", "experiments.export"):
        module = importlib.import_module(argv[0])
        cli.parse_flags(module._flags(), argv)  # an unknown flag is SystemExit
    else:
        assert importlib.util.find_spec(argv[0]) is not None, argv[0]


def _parse_run(argv):
    """(config, FlagValues) of an experiments.run command line."""
    from experiments.run import DEMO, _define
    return cli.parse_config([*argv], DEMO, homes=cli.EXPERIMENT_HOMES, define=_define)


def _run_commands():
    """{workdir: (config, its runs' folder names)} of the README's experiments.run commands."""
    from comigs_jax.experiment.loop import run_dir_of
    from experiments.run import default_workdir
    out = {}
    for argv in COMMANDS:
        if argv[0] != "experiments.run" or "--config_help" in argv:
            continue
        cfg, fv = _parse_run(argv)
        wd = os.path.normpath(fv.workdir or default_workdir(argv))
        methods, seeds = configuration.methods_of(cfg), configuration.seeds_of(cfg)
        dirs = [os.path.normpath(run_dir_of(wd, m, s, len(methods) * len(seeds))) for m in methods for s in seeds]
        out.setdefault(wd, []).append((cfg, dirs))
    return out


def _users(cfg):
    from comigs_jax.data.config import split_list
    if cfg.data.source == "synthetic":
        return [f"user{i}" for i in range(cfg.data.n_users)]
    return split_list(cfg.data.categories)[:cfg.data.n_users]


@pytest.mark.parametrize("argv", [a for a in COMMANDS if a[0] in ("experiments.generate", "experiments.export")],
                         ids=lambda a: " ".join(a)[:70])
def test_generate_and_export_name_a_run_and_user_the_readme_writes(argv):
    flags = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
    runs = [(cfg, dirs) for group in _run_commands().values() for cfg, dirs in group
            if os.path.normpath(flags["workdir"]) in dirs]
    assert runs, f"no README run command writes {flags['workdir']}"
    for cfg, _ in runs:
        assert flags["user"] in _users(cfg), f"{flags['user']} is not a user of that run: {_users(cfg)}"


def test_the_light_chain_runs_on_a_small_schedule(tmp_path, monkeypatch, tiny_cache):
    """The demo, then its generate and export examples, comigs-run on the packaged tiny config,
    capacity and --config_help: in an empty directory, as written plus the small schedule."""
    monkeypatch.chdir(tmp_path)
    light = [a for a in COMMANDS if rc.need_of(a) is None and not rc.is_heavy(a)]
    assert [a[0] for a in light][:1] == ["experiments.run"]  # the demo first: generate and export read it
    for i, argv in enumerate(light):
        # the demo draws its figures (a new user's first run, asserted below); the later run skips
        # them, about half its time (configs/tiny.py's figures: test_run)
        runs = argv[0] == "experiments.run" and "--config_help" not in argv
        no_figures = ["--config.output.figures=False"] if i and runs else []
        code, out, err = _main(rc.small(argv, tiny_cache) + no_figures)
        assert code == 0, (argv, out[-2000:], err[-2000:])
    assert (tmp_path / "runs" / "demo" / "comigs_s0" / "results.json").exists() and (tmp_path / "exported" / "user0").is_dir()
    assert (tmp_path / "runs" / "demo" / "comigs_s0" / "routing_tokens.png").stat().st_size > 0
    assert (tmp_path / "runs" / "tiny" / "results.json").exists()
