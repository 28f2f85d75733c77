"""A clean install (issue 31 item 6): the wheel holds the package, the shipped configs and the
commands, its console scripts resolve, the optional packages are extras, and a non-editable wheel
installed in a new virtual environment runs the packaged tiny config from another directory.

The wheel is built once per module (pip, a few seconds). The new environment gets the wheel alone
(pip --no-deps) and sees this environment's dependencies through a .pth line, which adds the
directory only: its own .pth files (this checkout's editable install) are not processed, so the
new environment's comigs_jax, configs and experiments are the wheel's or nothing."""
import configparser
import contextlib
import glob
import importlib
import io
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

import procenv
from comigs_jax import __version__, cli, extras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"comigs-run": "experiments.run:console", "comigs-study": "experiments.study:console",
           "comigs-bench": "experiments.bench:console", "comigs-export": "experiments.export:console",
           "comigs-generate": "experiments.generate:console",
           "comigs-capacity": "comigs_jax.capacity.command:console"}
OPTIONAL = {"llama": "gguf", "tensorboard": "tensorboardx", "wandb": "wandb", "dp": "dp-accounting"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of this checkout, built from a copy of its sources (no build/ left in the tree)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for f in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, f), src / f)
    for pkg in ("comigs_jax", "configs", "experiments"):
        shutil.copytree(os.path.join(REPO, pkg), src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (path,) = glob.glob(str(out / "*.whl"))
    return path


def _metadata(z: zipfile.ZipFile, name: str) -> str:
    (info,) = {n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA")}
    return z.read(f"{info}/{name}").decode()


def test_wheel_holds_package_configs_commands_and_metadata(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    for sub in ("comigs_jax", "configs", "experiments"):
        for path in glob.glob(os.path.join(REPO, sub, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, REPO).replace(os.sep, "/")
            assert rel in names, f"{rel} is not in the wheel"
    assert "comigs_jax/py.typed" in names
    assert not any(n.startswith("tests/") for n in names)
    eps = configparser.ConfigParser()
    eps.read_string(_metadata(z, "entry_points.txt"))
    assert dict(eps["console_scripts"]) == SCRIPTS
    meta = _metadata(z, "METADATA").splitlines()
    assert f"Version: {__version__}" in meta  # one version: setup.cfg reads comigs_jax.__version__
    requires = [line.split(":", 1)[1].strip().lower() for line in meta if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    for extra, dist in OPTIONAL.items():
        assert not any(r.startswith(dist) for r in core), f"{dist} is a dependency of the base install"
        assert any(r.startswith(dist) and f'extra == "{extra}"' in r for r in requires), extra
        assert any(r.startswith(dist) and 'extra == "test"' in r for r in requires), f"[test] lacks {dist}"


def test_console_scripts_resolve_and_run(wheel, capsys):
    """Each script's target is a callable whose module's main answers --help with exit code 0."""
    for name, target in SCRIPTS.items():
        module, attr = target.split(":")
        mod = importlib.import_module(module)
        assert callable(getattr(mod, attr)), name
        assert mod.main([name, "--help"]) == 0, name
        assert "--" in capsys.readouterr().out, name


def test_relative_config_found_in_the_package_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = os.path.join(cli.ROOT, "configs", "tiny.py")
    assert cli.config_path("configs/tiny.py") == tiny
    assert cli.resolve_config_arg(["x", "--config=configs/tiny.py:fedavg", "--config.seed=1"]) == [
        "x", f"--config={tiny}:fedavg", "--config.seed=1"]
    assert cli.resolve_config_arg(["x", "--config", "configs/demo.py"])[2] == os.path.join(cli.ROOT, "configs", "demo.py")
    cfg, _ = cli.parse_config(["x", "--config=configs/tiny.py", "--config.train.rounds=1"], "configs/demo.py",
                              homes=cli.EXPERIMENT_HOMES)
    assert (cfg.data.n_users, cfg.train.rounds) == (3, 1)
    with pytest.raises(cli.UsageError, match="configs/nope.py' not found .*working directory, then from"):
        cli.parse_config(["x", "--config=configs/nope.py"], "configs/demo.py", homes=cli.EXPERIMENT_HOMES)
    assert cli.resume_command("experiments.run", ["/venv/bin/comigs-run", "--config=a.py"]) == "comigs-run --config=a.py"
    assert cli.resume_command("experiments.run", ["run.py", "--x=1"]) == "python -m experiments.run --x=1"


@pytest.mark.parametrize("extra,module", [("llama", "gguf"), ("tensorboard", "tensorboardX")])
def test_missing_extra_is_one_line_naming_it(extra, module, tmp_path, monkeypatch):
    """A config that needs an optional package that is not installed: one line naming the extra,
    before any work (nothing written)."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ModuleNotFoundError
    monkeypatch.setattr(extras, "available", lambda m: m != module)
    with pytest.raises(extras.MissingExtra, match=rf"pip install 'comigs_jax\[{extra}\]'"):
        extras.require(module)
    override = {"llama": "--config.base=smollm2-135m", "tensorboard": "--config.output.tensorboard=True"}[extra]
    from experiments import run
    wd = tmp_path / "wd"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run.main(["comigs-run", f"--config={REPO}/configs/tiny.py", f"--workdir={wd}", override])
    lines = err.getvalue().strip().splitlines()
    assert code == 1 and len(lines) == 1 and f"comigs_jax[{extra}]" in lines[0], err.getvalue()
    assert not wd.exists()


def test_fresh_venv_runs_the_packaged_tiny_config(wheel, tmp_path, tiny_cache):
    """The wheel in a new venv: `comigs-run --config=configs/tiny.py` from an empty directory runs
    the shipped config (one round) with the wheel's code."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    (purelib,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    with open(os.path.join(purelib, "_comigs_test_deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = procenv.env()
    env.pop("PYTHONPATH", None)
    where = subprocess.run([py, "-c", "import comigs_jax, configs, experiments, comigs_jax.cli as c; "
                            "print(comigs_jax.__file__, configs.__file__, experiments.__file__, c.ROOT)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(p.startswith(purelib) for p in where.stdout.split()), where.stdout
    run = subprocess.run([str(venv / "bin" / "comigs-run"), "--config=configs/tiny.py", "--config.train.rounds=1",
                          "--config.output.figures=False", f"--config.data.cache_dir={tiny_cache}", "--workdir=wd"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((work / "wd" / "results.json").read_text())
    assert res["provenance"]["versions"]["comigs_jax"] == __version__ and res["provenance"]["git"] is None
    assert len(res["users"]) == 3 and all(u["test_ppl"] > 1 for u in res["users"])
