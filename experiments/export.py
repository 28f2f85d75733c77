"""Export users' personalised models of a finished run as folders other tools read.

    python -m experiments.export --workdir=runs/demo --user=user0 --out=exported
    python -m experiments.export --workdir=runs/smollm2/comigs_s0 --all --out=exported

Writes OUT/<user>/ for the user (or every user with --all): base/ (the frozen base, HF format, with
its tokenizer for text data), attn_adapter/ (the attention LoRA as a peft adapter), experts.safetensors
(the LoRA experts and routers) and comigs.json; docs/export.md describes every file.
comigs_jax.experiment.export.load_exported(OUT/<user>) rebuilds the Flax model. Bad input (no
finished run, an unknown user, an --out that exists and is not empty) is one line on stderr, exit
code 1, and nothing is written; OUT appears only when every user's folder is complete.
"""
from __future__ import annotations

import sys

from absl import flags

from comigs_jax import cli


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A finished run's folder (results.json inside).", flag_values=fv)
    flags.DEFINE_string("user", None, "The user to export (a name of the run's results.json).", flag_values=fv)
    flags.DEFINE_bool("all", False, "Export every user of the run.", flag_values=fv)
    flags.DEFINE_string("out", None, "A new (or empty) folder: OUT/<user>/ per user.", flag_values=fv)
    return fv


def main(argv=None) -> int:
    """The command line `python -m experiments.export ...`; its exit code."""
    argv = list(sys.argv if argv is None else argv)

    def body():
        fv = cli.parse_flags(_flags(), argv, __doc__)
        if not fv.workdir or not fv.out or bool(fv.user) == bool(fv.all):
            raise SystemExit("error: --workdir, --out and one of --user=NAME or --all are required")
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # orbax reports every restore step at INFO
        from comigs_jax.experiment import export
        export.export_run(fv.workdir, fv.out, None if fv.all else [fv.user],
                          log=lambda m: print(m, flush=True))
        return 0

    return cli.main_guard(body)


def console() -> int:
    """The console script `comigs-export` (setup.cfg): `main` in its own process."""
    cli.install_process_hooks()
    return main()


if __name__ == "__main__":
    sys.exit(console())
