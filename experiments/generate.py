"""Sample text from one user's personalised model of a finished run.

    python -m experiments.generate --workdir=runs/demo --user=user0 --prompt "3 14 15" --tokens=40
    python -m experiments.generate --workdir=runs/smollm2/comigs_s0 --user=code \
        --prompt "def main(" --temperature=0.7 --top_k=40 --seed=1 --html=sample.html

The model is the user's state in the run's last checkpoint (the base, its adapters after the
final aggregation: comigs_jax.experiment.generation). A jitted prefill and KV-cached decode loop
(comigs_jax.model.decode) samples --tokens tokens (--temperature 0: greedy; --top_k 0: the whole
vocabulary). With --color=always (or auto in a terminal) each token is printed on a background
from white (the user's specialists) to blue (the generalists) by its routers' weight;
--html=FILE writes the same as a web page. Bad input (no finished run, unknown user, a prompt
longer than the context) is one line on stderr, exit code 1, before any compile.
"""
from __future__ import annotations

import sys

from absl import flags

from comigs_jax import cli


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A finished run's folder (results.json inside).", flag_values=fv)
    flags.DEFINE_string("user", None, "The user whose model samples (a name of the run's results.json).",
                        flag_values=fv)
    flags.DEFINE_string("prompt", "", "The text to continue (synthetic data: space-separated token ids).",
                        flag_values=fv)
    flags.DEFINE_integer("tokens", 32, "New tokens to sample.", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_enum("color", "auto", ["auto", "always", "never"],
                      "Colour each token by its generalist weight (ANSI; auto: when stdout is a terminal).",
                      flag_values=fv)
    flags.DEFINE_string("html", None, "Also write the coloured text to this HTML file.", flag_values=fv)
    return fv


def main(argv=None) -> int:
    """The command line `python -m experiments.generate ...`; its exit code."""
    argv = list(sys.argv if argv is None else argv)

    def body():
        fv = cli.parse_flags(_flags(), argv, __doc__)
        if not fv.workdir or not fv.user:
            raise SystemExit("error: --workdir and --user are required (a finished run's folder and one of its users)")
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # orbax reports every restore step at INFO
        from comigs_jax.experiment import generation
        model = generation.load_user_model(fv.workdir, fv.user)
        out = model.generate(fv.prompt, n_new=fv.tokens, temperature=fv.temperature, top_k=fv.top_k, seed=fv.seed)
        color = fv.color == "always" or (fv.color == "auto" and sys.stdout.isatty())
        print(generation.ansi(out.pieces, out.generalist_weight, out.n_prompt) if color else out.text, flush=True)
        if fv.html:
            title = f"{fv.user} ({model.run_dir}), temperature {fv.temperature}, top-k {fv.top_k}, seed {fv.seed}"
            with open(fv.html, "w") as f:
                f.write(generation.html_page(out.pieces, out.generalist_weight, out.n_prompt, title))
            print(f"wrote {fv.html}", file=sys.stderr, flush=True)
        return 0

    return cli.main_guard(body)


def console() -> int:
    """The console script `comigs-generate` (setup.cfg): `main` in its own process."""
    cli.install_process_hooks()
    return main()


if __name__ == "__main__":
    sys.exit(console())
