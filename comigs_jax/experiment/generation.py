"""Text from one user's personalised model of a finished run (`python -m experiments.generate`).

    model = load_user_model("runs/demo", "user0")        # checks everything before any compile
    out = model.generate("12 7 3", n_new=40, temperature=0.8, top_k=20, seed=0)
    print(ansi(out.pieces, out.generalist_weight, out.n_prompt))

The user's model is its state in the run's last checkpoint: the base, and its adapters after the
final aggregation (the generalists averaged over the federation, its specialists and router its
own), which is the model the user keeps after the run. Its tokens are the run's: the base's
tokenizer for text data, and for synthetic data the token ids themselves (a prompt of
space-separated integers). Every bad input is one line raised before anything is compiled: a
workdir with no finished run or an unknown user (a `RestoreError`, comigs_jax.experiment.restore,
which restores the model), a prompt longer than the context (a `GenerationError`).
"""
from __future__ import annotations

import dataclasses
import html
from typing import Optional

import numpy as np

from comigs_jax.experiment.restore import RestoreError, open_run, restore_rows


class GenerationError(RestoreError):
    """Generation cannot start (one line: what, and what is allowed)."""


@dataclasses.dataclass
class Generated:
    tokens: np.ndarray  # [P + n] token ids
    pieces: list  # the text of each token
    generalist_weight: Optional[np.ndarray]  # [P + n] routers' weight on the generalists, or None
    n_prompt: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclasses.dataclass
class UserModel:
    """One user's model of a finished run, ready to sample from."""

    user: str
    run_dir: str
    model_cfg: object
    params: dict  # base and the user's adapters, merged (host arrays)
    expert_mask: np.ndarray  # [E] bool
    context: int  # the longest sequence, prompt and new tokens: the base's n_positions
    synthetic: bool
    tokenizer: Optional[object]
    n_generalists: int

    def encode(self, prompt: str) -> np.ndarray:
        """The prompt's token ids; GenerationError (one line) when it cannot be one, or is empty."""
        if self.synthetic:
            try:
                ids = [int(t) for t in prompt.split()]
            except ValueError:
                raise GenerationError(f"this run's data are synthetic token ids: the prompt must be space-separated "
                                      f"integers in [0, {self.model_cfg.vocab_size}), not {prompt[:40]!r}") from None
            bad = [i for i in ids if not 0 <= i < self.model_cfg.vocab_size]
            if bad:
                raise GenerationError(f"prompt token {bad[0]} is outside the vocabulary [0, {self.model_cfg.vocab_size})")
        else:
            ids = list(self.tokenizer.encode(prompt))
        if not ids:
            raise GenerationError("the prompt is empty: give at least one token")
        return np.asarray(ids, np.int32)

    def decode_pieces(self, ids) -> list[str]:
        if self.synthetic:
            return [f"{int(t)} " for t in ids]
        return [self.tokenizer.decode([int(t)]) for t in ids]

    def check_length(self, n_prompt: int, n_new: int) -> None:
        if n_new < 1:
            raise GenerationError(f"--tokens={n_new}: generate at least one token")
        if n_prompt >= self.context:
            raise GenerationError(f"the prompt has {n_prompt} tokens, the model's context is {self.context}: "
                                  f"shorten it to at most {self.context - 1} tokens")
        if n_prompt + n_new > self.context:
            raise GenerationError(f"{n_prompt} prompt tokens + {n_new} new ones exceed the model's context of "
                                  f"{self.context}: ask for at most {self.context - n_prompt} new tokens")

    def generate(self, prompt: str, n_new: int = 32, temperature: float = 1.0, top_k: int = 0,
                 seed: int = 0) -> Generated:
        import jax
        import jax.numpy as jnp

        from comigs_jax.model import decode
        if temperature < 0:
            raise GenerationError(f"--temperature={temperature}: must be >= 0 (0 = greedy)")
        if top_k < 0:
            raise GenerationError(f"--top_k={top_k}: must be >= 0 (0 = the whole vocabulary)")
        ids = self.encode(prompt)
        self.check_length(len(ids), n_new)
        tokens, w = decode.generate(self.model_cfg, self.params, jnp.asarray(ids)[None], jax.random.key(seed),
                                    n_new=n_new, temperature=float(temperature), top_k=int(top_k),
                                    expert_mask=jnp.asarray(self.expert_mask))
        tokens = np.asarray(tokens)[0]
        return Generated(tokens, self.decode_pieces(tokens), None if w is None else np.asarray(w)[0], len(ids))


def load_user_model(workdir: str, user: str) -> UserModel:
    """The user's model of the workdir's finished run (comigs_jax.experiment.restore). RestoreError
    (one line) for a workdir with no finished run or an unknown user (the message lists the run's
    users); nothing is compiled before these checks."""
    run = open_run(workdir, [user])
    params, mask = run.user_params(user, restore_rows(run))
    context = run.base_cfg.n_positions  # GPT-2's position table; a Llama's configured maximum (RoPE)
    return UserModel(user, run.run_dir, run.model_cfg, params, mask, int(context), run.synthetic, run.tokenizer(),
                     run.model_cfg.moe.n_generalists)


# ----------------------------------------------------------------------------- rendering
def _rgb(w: float) -> tuple[int, int, int]:
    """White (specialists) to blue (generalist), as the run's routing picture."""
    w = float(np.clip(w, 0.0, 1.0))
    return int(255 - 205 * w), int(255 - 145 * w), 255


def ansi(pieces, weights, n_prompt: int) -> str:
    """The text with each generated token on a 24-bit background by its generalist weight
    (prompt tokens underlined); plain text when weights is None."""
    if weights is None:
        return "".join(pieces)
    out = []
    for i, (p, w) in enumerate(zip(pieces, weights)):
        r, g, b = _rgb(w)
        style = f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m" + ("\x1b[4m" if i < n_prompt else "")
        out.append(style + p + "\x1b[0m")
    return "".join(out)


def html_page(pieces, weights, n_prompt: int, title: str) -> str:
    """A standalone HTML page of the text, each token's background by its generalist weight (the
    weight in its tooltip; the prompt underlined)."""
    spans = []
    for i, p in enumerate(pieces):
        w = None if weights is None else float(weights[i])
        style = "" if w is None else "background:rgb({},{},{});".format(*_rgb(w))
        if i < n_prompt:
            style += "text-decoration:underline;"
        tip = "" if w is None else f' title="generalist weight {w:.3f}"'
        spans.append(f'<span style="{style}"{tip}>{html.escape(p)}</span>')
    legend = ("" if weights is None else "<p>Background: the routers' weight on the generalist expert(s), "
              "averaged over layers, from white (0: specialists) to blue (1: generalists). The prompt is underlined.</p>")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h3>{html.escape(title)}</h3>{legend}<pre style=\"white-space:pre-wrap;font-size:15px\">"
            + "".join(spans) + "</pre></body></html>\n")
