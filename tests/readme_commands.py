"""Every command of the README, as written: extracted from its ```bash blocks and its inline
`python -m ...` examples, parsed (every config file, key and flag exists), checked against each
other (a `generate` / `export` example names a folder and a user that the README's run command
writing that workdir produces) and, where this machine has what they need, run on a small
schedule: the same command with overrides appended that shrink the data, the model and the rounds.

    python tests/readme_commands.py          # run every runnable command (a few minutes), print a table
    python tests/readme_commands.py --list   # what each command is and how it is checked

tests/test_readme.py runs the checks and the light chain (the demo, generate, export, comigs-run,
capacity, --config_help) in the test process; this script also runs the heavy ones (the 8-run
comparison, two processes, the benches, a study) as subprocesses.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"comigs-run": "experiments.run", "comigs-study": "experiments.study", "comigs-bench": "experiments.bench",
           "comigs-export": "experiments.export", "comigs-generate": "experiments.generate",
           "comigs-capacity": "comigs_jax.capacity"}
# Appended to a run on the demo's synthetic data: seconds instead of minutes, same code paths.
SMALL = ["--config.train.rounds=2", "--config.train.local_steps=2", "--config.train.batch_size=4",
         "--config.train.seq_len=16", "--config.train.router_every=2", "--config.train.router_steps=1",
         "--config.data.train_tokens=2000", "--config.data.valid_tokens=600", "--config.data.test_tokens=600",
         "--config.data.synthetic.vocab_size=64", "--config.model.rank=4", "--config.model.attn_rank=4",
         "--config.eval.every_rounds=2", "--config.checkpoint.every_rounds=2", "--config.pretrain.n_layer=1",
         "--config.pretrain.n_embd=32", "--config.pretrain.n_head=2", "--config.pretrain.steps=5",
         "--config.pretrain.batch_size=4", "--config.pretrain.tokens=5000", "--config.output.progress=False"]
SMALL_BENCH = ["--config.models=tiny", "--config.users=1,4", "--config.repeats=1", "--config.min_repeats=1",
               "--config.matmul_size=256", "--config.loop_max_users=4"]
# Why a command cannot run here (it is still parsed and checked): a substring of it -> the reason.
NEEDS = {"slimpajama": "the Hugging Face Hub", "agnews": "the Hugging Face Hub", "wikipedia": "the Hugging Face Hub",
         "/path/to/gpt2": "a local GPT-2 directory", "local_text": "the local corpus (apt packages)",
         "smollm2": "the local corpus (apt packages)", "prepare_local_corpus": "apt packages (groff, man pages)",
         "where_comigs_wins": "a 48-run study (minutes on 2 cores)",
         "many_users": "the many-users corpus (apt packages; tests/test_many_users.py runs it on a tiny one)",
         "--report=DIR/": "a finished study's study.json (tests/test_study_per_method.py runs --report on one)"}
HEAVY = ("launch_local", "experiments.bench", "bench_federations", "--config.seeds=0,1")


def readme_text() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def commands(text: str | None = None) -> list[list[str]]:
    """argv of every project command in the README (python -m <module> ... as [module, args...];
    a console script as its module), in order, without duplicates."""
    text = readme_text() if text is None else text
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`((?:python -m|comigs-[a-z]+ )[^`]*)`", text.replace("\n", " "))
    out = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part.split(" # ")[0].strip()) if part.strip() else []
            while words and (words[0].endswith("python") or words[0].endswith("python3")) and words[1:2] == ["-m"]:
                words = words[2:]
            if words and words[0] in MODULES:
                words = [MODULES[words[0]], *words[1:]]
            if words and words[0].startswith(("experiments.", "comigs_jax.")) and "<" not in words[0]:
                if words not in out:
                    out.append(words)
    return out


def need_of(argv: list[str]) -> str | None:
    if "--config_help" in argv:  # lists the config's keys: needs nothing
        return None
    text = " ".join(argv)
    return next((why for key, why in NEEDS.items() if key in text), None)


def is_heavy(argv: list[str]) -> bool:
    return any(h in " ".join(argv) for h in HEAVY)


def small(argv: list[str], cache: str) -> list[str]:
    """argv with the small schedule appended (after the command's own flags, so they win)."""
    module = argv[0]
    cache_flag = f"--config.data.cache_dir={cache}"
    if module in ("experiments.run", "experiments.bench_federations"):
        return [*argv, *SMALL, cache_flag]
    if module == "experiments.launch_local":
        return [*argv, *SMALL, cache_flag] if "--module" not in argv else [*argv, *SMALL_BENCH[1:]]
    if module == "experiments.bench":
        return [*argv, *SMALL_BENCH, "--config.out_dir=runs/bench"]
    if module == "experiments.study":
        return [*argv, *SMALL, cache_flag, "--config.seeds=0,1"]  # a study compares: 2 seeds at least
    if module == "experiments.generate":
        return [*argv, "--tokens=4"] if not any(a.startswith("--tokens") for a in argv) else argv
    return list(argv)


def run_subprocess(argv: list[str], cwd: str, env=None, timeout=900) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def main(args) -> int:
    import tempfile
    listing = "--list" in args
    work = tempfile.mkdtemp(prefix="readme-commands-")
    cache = os.path.join(work, "cache")
    failed = 0
    for argv in commands():
        need = need_of(argv)
        what = "not here: " + need if need else ("heavy" if is_heavy(argv) else "light")
        if listing or need:
            print(f"{what:50s} {' '.join(argv)}", flush=True)
            continue
        p = run_subprocess(small(argv, cache), work)
        ok = p.returncode == 0
        failed += not ok
        print(f"{'ok' if ok else 'FAILED':6s} {what:43s} {' '.join(argv)}", flush=True)
        if not ok:
            print((p.stdout[-1500:] + p.stderr[-1500:]).replace("\n", "\n    "), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
