"""Run a study: a grid of configs (methods x seeds in every cell), resumable, summarised.

    python -m experiments.study --config=configs/studies/generalists.py
    python -m experiments.study --config=configs/studies/where_comigs_wins.py --workdir=runs/studies/g
    python -m experiments.study --config=configs/studies/granularity.py --config.data.source=agnews \\
        --config.base=gpt2 --config.seeds=0,1,2

A study config is an experiment config plus a `study` group (comigs_jax/experiment/study.py):
`--config.KEY=VALUE` overrides any key, `--config.study.grid=...` the grid. Each cell runs in
WORKDIR/cells/<key=value__...>/; running the command again skips finished cells and resumes the
others. Writes WORKDIR/study.json, study.md and study.png.

    python -m experiments.study --report=docs/studies/participation.json

rewrites a study's outputs from its study.json alone, nothing run: the comparisons recomputed from
the per-seed rows, then participation.json / .md / .png beside it (a file that is not a study.json:
one line, nothing written). Bad input (an unknown grid key, a value
the config rejects, another study's folder): one line on stderr before any run, exit code 1.
"""
from __future__ import annotations

import os
import sys

from absl import flags, logging

from comigs_jax import cli

DEFAULT = os.path.join(cli.REPO, "configs", "studies", "where_comigs_wins.py")
HOMES = dict(cli.EXPERIMENT_HOMES, study="comigs_jax/experiment/study.py")


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Output directory (default: runs/studies/<study.name>).", flag_values=fv)
    flags.DEFINE_string("report", None, "A study.json: rewrite its .json / .md / .png beside it from it alone "
                        "(comparisons recomputed, nothing run); takes no other flag.", flag_values=fv)


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg, fv = cli.parse_config(argv, DEFAULT, homes=HOMES, define=_define, doc=__doc__)
        if fv.report is not None:
            return _report(fv.report, argv)
        from comigs_jax import compilation_cache
        from comigs_jax.experiment import study
        compilation_cache.configure(cfg)  # every cell's process-wide cache, before the first compile
        workdir = fv.workdir or os.path.join("runs", "studies", cfg.study.name)
        logging.set_verbosity(logging.WARNING)
        resume = cli.resume_command("experiments.study", argv)
        cli.as_exit(lambda: study.run_study(cfg, workdir), resume)

    return cli.main_guard(body)


def _report(path: str, argv) -> None:
    """--report=STUDY_JSON: the study's outputs regenerated from it (study_report.regenerate)."""
    from comigs_jax.experiment import study_report
    args = list(argv[1:])
    others = [a for i, a in enumerate(args) if not a.startswith("--report")
              and not (i and args[i - 1] == "--report")]  # `--report PATH` too
    if others or not path:
        why = f"not with {others[0]}" if others else "a path"
        raise cli.UsageError(f"--report={path} is not allowed: {why}; allowed: --report=PATH/TO/study.json alone "
                             "(it rewrites the outputs beside it from it, no config, nothing run)")
    summary = cli.as_exit(lambda: study_report.regenerate(path))
    stem = os.path.splitext(path)[0]
    print(f"[study {summary['study']}] regenerated {stem}.json, {stem}.md, {stem}.png from {path}", flush=True)


def console() -> int:
    """The console script `comigs-study` (setup.cfg): `main` in its own process."""
    cli.install_process_hooks()
    return main()


if __name__ == "__main__":
    sys.exit(console())
