"""Checkpoints of a whole federated run with orbax: every user's params and optimizer states,
step counters, keys, and a JSON record of the host-side state (round, participation sampler).

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
checkpoint interrupted mid-write is never listed as a complete one.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def _flat(tree) -> dict:
    """A pytree as {path string: leaf}: stable names for orbax, whatever the node types."""
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class RunCheckpoints:
    """Numbered (by round) checkpoints under `directory`."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def all_rounds(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, round_index: int, state, meta: dict) -> None:
        self.manager.save(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(state)), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, round_index: int, template):
        """(state shaped and sharded like `template`, meta dict) of checkpoint `round_index`."""
        flat = _flat(template)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                    for k, v in flat.items()}
        out = self.manager.restore(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        leaves = [out.state[k] for k in flat]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves), out.meta

    def delete_all(self) -> None:
        for r in self.all_rounds():
            self.manager.delete(r)

    def close(self) -> None:
        self.manager.close()
