"""The experiment's log: lines printed by process 0 only."""
from __future__ import annotations

import jax


def log(msg: str) -> None:
    """Print on process 0 only (the other processes of a multi-host run log nothing but errors)."""
    if jax.process_index() == 0:
        print(msg, flush=True)
