"""Train and evaluate CoMiGS (or any method) on a federation of users; compare methods.

    python -m experiments.run                                        # the demo (configs/demo.py)
    python -m experiments.run --config=configs/slimpajama.py:comigs --workdir=runs/sp
    python -m experiments.run --config.methods=local,fedavg,pfedmoe,comigs --config.seeds=0,1

Flag parsing and one call: the loop is comigs_jax.experiment.run (one run per (method, seed) in
WORKDIR/<method>_s<seed>/; running the same command again resumes every run). Errors are one line
on stderr with exit code 1; a signal stops after the round with 128 + signum.
"""
from __future__ import annotations

import os
import signal
import sys

from absl import flags, logging

from comigs_jax import cli

DEMO = os.path.join(cli.ROOT, "configs", "demo.py")


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>[_<argument>]).",
                        flag_values=fv)


def default_workdir(argv) -> str:
    """runs/<config file stem>[_<argument>], from the --config flag as typed."""
    path, _, arg = cli.config_spec(argv[1:], DEMO).partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{stem}_{arg}" if arg else stem)


def main(argv=None) -> int:
    """The command line `python -m experiments.run ...` (argv[0] is the program); its exit code."""
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg, fv = cli.parse_config(argv, DEMO, homes=cli.EXPERIMENT_HOMES, define=_define, doc=__doc__)
        from comigs_jax import compilation_cache, configuration, distributed, experiment
        configuration.validate(cfg)  # before the distributed start-up and any JAX work
        compilation_cache.configure(cfg)  # before the first compile
        workdir = fv.workdir or default_workdir(argv)
        logging.set_verbosity(logging.WARNING)  # orbax and absl report every checkpoint step at INFO
        multi = distributed.initialize(cfg.distributed)  # before any JAX computation; no-op for one process
        resume = cli.resume_command("experiments.run", argv)
        # a CleanStop (a signal) is agreed by every process: the normal exit, through the shutdown barrier
        distributed.run_or_exit(lambda: cli.as_exit(lambda: experiment.run(cfg, workdir), resume), multi,
                                clean=(cli.CleanStop,))

    return cli.main_guard(body)


def console() -> int:
    """The console script `comigs-run` (setup.cfg): `main` in its own process. A one-process run
    stopped by a signal ends here with os._exit once its checkpoint and message are out: the
    interpreter's teardown of native threads (XLA, tensorstore) after a signal stop sometimes
    aborted the process (SIGABRT, 'FATAL: exception not rethrown', about 1 stop in 6 on 2 cores),
    turning a clean stop's 128 + signum into -6. Several processes keep the normal exit: their
    agreed stop goes through jax.distributed's shutdown barrier."""
    cli.install_process_hooks()
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and _one_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _one_process() -> bool:
    jax = sys.modules.get("jax")
    return jax is None or jax.process_count() == 1


if __name__ == "__main__":
    sys.exit(console())
