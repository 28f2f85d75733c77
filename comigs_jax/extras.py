"""Optional dependencies (the package's extras, setup.cfg): what needs them and the one line that
names the extra to install when one is missing.

    from comigs_jax import extras
    gguf = extras.require("gguf")                 # the module, or MissingExtra (one line)
    extras.check_config(cfg)                      # before any work: every extra the config asks for

The base install runs the demo, the synthetic and local-text sources and GPT-2 bases; each extra
adds one thing only some users need: `llama` (gguf: a llama.cpp GGUF base such as SmolLM2-135M),
`tensorboard` (tensorboardX: output.tensorboard), `wandb` (output.wandb), `dp` (dp-accounting:
user-level differential privacy). `pip install -e '.[test]'` installs all of them.
"""
from __future__ import annotations

import importlib
import importlib.util

from comigs_jax.errors import ExperimentError

# import name -> (distribution, extra, what needs it)
EXTRAS = {
    "gguf": ("gguf", "llama", "a llama.cpp GGUF base (base=smollm2-135m or a .gguf file)"),
    "tensorboardX": ("tensorboardX", "tensorboard", "TensorBoard events (output.tensorboard=True)"),
    "wandb": ("wandb", "wandb", "Weights & Biases logging (output.wandb=True)"),
    "dp_accounting": ("dp-accounting", "dp", "user-level differential privacy (dp.enabled=True)"),
}


class MissingExtra(ExperimentError, ImportError):
    """An optional dependency that is not installed; the message names the extra to install."""


def message(module: str) -> str:
    dist, extra, what = EXTRAS[module]
    return (f"{what} needs the optional package '{dist}', which is not installed: "
            f"pip install 'comigs_jax[{extra}]' (or pip install {dist})")


def available(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str):
    """`module` imported; MissingExtra (one line naming the extra) when it is not installed."""
    if module not in EXTRAS:
        raise KeyError(f"{module!r} is not an optional dependency of comigs_jax ({', '.join(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != module:
            raise  # the package is there but one of its own dependencies is not: its own error
        raise MissingExtra(message(module)) from None


def needed_by(cfg) -> list[str]:
    """The optional modules an experiment config asks for (configs/base.py keys)."""
    out = []
    base = str(cfg.get("base", "") or "")
    if base.lower() == "smollm2-135m" or base.endswith(".gguf"):
        out.append("gguf")
    output = cfg.get("output")
    if output is not None and output.get("tensorboard", False):
        out.append("tensorboardX")
    if output is not None and output.get("wandb", False):
        out.append("wandb")
    dp = cfg.get("dp")
    if dp is not None and dp.get("enabled", False):
        out.append("dp_accounting")
    return out


def check_config(cfg) -> None:
    """MissingExtra (one line) for the first optional package `cfg` needs that is not installed:
    called by configuration.validate, before any data, base or compile work."""
    for module in needed_by(cfg):
        if not available(module):
            raise MissingExtra(message(module))
