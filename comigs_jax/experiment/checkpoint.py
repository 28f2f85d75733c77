"""Checkpoints of a whole federated run with orbax: every user's params and optimizer states,
step counters, keys, and a JSON record of the host-side state (round, participation sampler).

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
checkpoint interrupted mid-write is never listed as a complete one (leftover temporary folders
are removed when the manager opens). Each checkpoint also records a fingerprint of the state
(a wrap-around uint32 sum of every leaf's bits, computed on device, so it works for sharded
arrays) and the run's identity; `restore_latest` checks both, and the shapes against the current
model, and falls back to the previous complete checkpoint when the latest cannot be read.

Saves are asynchronous by default (checkpoint.async_save): `save` returns once orbax has copied
the arrays to host memory (its blocking part) and the fingerprint is computed, and a background
thread writes and renames the folder while the next rounds train. At most one save is in flight
(orbax's next save, `wait`, `close` wait for it); until it is renamed the previous complete
checkpoint is the latest listed on disk, so a kill at any moment still resumes from a complete one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from comigs_jax import distributed
from comigs_jax.errors import ExperimentError
from comigs_jax.experiment.identity import ADDED_KEYS, first_difference


class CheckpointError(ExperimentError):
    """A checkpoint that cannot be used (one line: which, why, what to do)."""


def _flat(tree) -> dict:
    """A pytree as {path string: leaf}: stable names for orbax, whatever the node types."""
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _bits32(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2 words


@jax.jit
def _leaf_sums(leaves):
    return jnp.stack([jnp.sum(_bits32(x), dtype=jnp.uint32) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


def fingerprint(tree) -> list[int]:
    """Per leaf, the sum (mod 2**32) of its bits as uint32 words: any changed word changes it."""
    return [int(v) for v in np.asarray(jax.device_get(_leaf_sums(jax.tree_util.tree_leaves(tree))))]


class RunCheckpoints:
    """Numbered (by round) checkpoints under `directory`; a context manager that closes orbax's
    manager on the way out (waiting for a save in flight), whatever ends the run.

    async_save: `save` returns while its folder is still being written (`wait` for it); False:
    `save` returns once the checkpoint is complete."""

    def __init__(self, directory: str, max_to_keep: int = 2, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        self.async_save = bool(async_save)
        self.pending: int | None = None  # the round of the save that may be in flight
        self.complete: int | None = None  # the round of the last save known complete (this process's)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=self.async_save))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def all_rounds(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, round_index: int, state, meta: dict) -> None:
        """Checkpoint `round_index`; meta is JSON, stored with the state's fingerprint. Returns
        once `state` may change (donated to the next round): its arrays are on the host and meta
        is copied; asynchronous saves are complete after `wait` (or the next save, or `close`)."""
        self.wait()  # orbax's save waits for the previous one anyway; this records which is complete
        meta = json.loads(json.dumps(dict(meta, fingerprint=fingerprint(state))))  # a copy the thread owns
        self.pending = round_index
        self.manager.save(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(state)), meta=ocp.args.JsonSave(meta)), force=True)
        if not self.async_save:
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete: renamed to its final folder. A save
        that failed in orbax's thread raises here (CheckpointError), never passes for complete."""
        r, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()  # re-raises an exception of orbax's finalize thread
        except Exception as e:  # noqa: BLE001 - whatever the write raised (disk full, permissions)
            raise CheckpointError(f"the checkpoint of round {r} in {self.directory} could not be written "
                                  f"({_brief(e)}); the previous checkpoints are intact") from e
        if r is None:
            return
        if not os.path.isdir(os.path.join(self.directory, str(r))):
            raise CheckpointError(f"the checkpoint of round {r} in {self.directory} was not written (orbax's "
                                  "background save failed: see the log above); the previous checkpoints are intact")
        self.complete = r

    def last_complete(self) -> int | None:
        """The round of the newest complete save, without waiting (any thread: a save in flight
        is complete once orbax has renamed its folder to the round's number)."""
        pending = self.pending
        if pending is not None and os.path.isdir(os.path.join(self.directory, str(pending))):
            return pending
        return self.complete

    def restore(self, round_index: int, template):
        """(state shaped and sharded like `template`, meta dict) of checkpoint `round_index`."""
        flat = _flat(template)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                    for k, v in flat.items()}
        out = self.manager.restore(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        leaves = [out.state[k] for k in flat]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves), out.meta

    def check_shapes(self, round_index: int, template) -> None:
        """CheckpointError unless checkpoint `round_index` holds the leaves, shapes and dtypes of
        `template` (a checkpoint of another model: users, experts, rank, method, base)."""
        flat = _flat(template)
        stored = self.manager.item_metadata(round_index)["state"]
        stored = dict(getattr(stored, "tree", stored))
        where = f"checkpoint of round {round_index} in {self.directory}"
        missing, extra = sorted(set(flat) - set(stored)), sorted(set(stored) - set(flat))
        if missing or extra:
            what = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model lacks") + \
                (f" ({len(missing) + len(extra) - 1} more differences)" if len(missing) + len(extra) > 1 else "")
            raise CheckpointError(f"{where} was written for another model: it {what}; "
                                  "use another --workdir, or --config.resume=False to start afresh")
        for k, v in flat.items():
            shape, dtype = tuple(stored[k].shape), np.dtype(stored[k].dtype)
            if shape != tuple(v.shape) or dtype != np.dtype(v.dtype):
                raise CheckpointError(
                    f"{where} was written for another model: {k} is {dtype}{list(shape)} there, "
                    f"{np.dtype(v.dtype)}{list(v.shape)} now; use another --workdir, or --config.resume=False "
                    "to start afresh")

    def restore_latest(self, template, identity: dict | None = None, log=print):
        """(round, state, meta) of the latest checkpoint that restores intact, or None when there
        is none. A checkpoint that cannot be read or fails its fingerprint is reported and moved
        to `<directory>_corrupt/`, and the previous one is tried; if none can be restored, or
        the checkpoints belong to another run or model, raises CheckpointError (never None: an
        existing run is not silently restarted from scratch)."""
        rounds = sorted(self.all_rounds(), reverse=True)
        failed = []
        for r in rounds:
            try:
                meta = self.manager.restore(r, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001 - unreadable is corrupt, whatever orbax raises
                failed.append((r, f"its metadata cannot be read ({_brief(e)})"))
                continue
            if identity is not None and meta.get("identity") is not None:
                new = json.loads(json.dumps(identity, default=str))
                old = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **meta["identity"]}  # keys added since
                diff = first_difference(old, new)
                if diff:
                    raise CheckpointError(f"checkpoint of round {r} in {self.directory} belongs to a run of "
                                          f"another config ({diff}); use another --workdir")
            try:
                self.check_shapes(r, template)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001
                failed.append((r, f"its array metadata cannot be read ({_brief(e)})"))
                continue
            try:
                state, meta = self.restore(r, template)
            except Exception as e:  # noqa: BLE001
                failed.append((r, f"it cannot be read ({_brief(e)})"))
                continue
            if meta.get("fingerprint") is not None and fingerprint(state) != meta["fingerprint"]:
                failed.append((r, "its arrays do not match the fingerprint written with them"))
                continue
            if failed:
                for f, why in failed:
                    log(f"warning: checkpoint of round {f} is corrupt ({why}); falling back to round {r}")
                self._set_aside([f for f, _ in failed], log)
            return r, state, meta
        if failed:
            detail = "; ".join(f"round {f}: {why}" for f, why in failed)
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored ({detail}); "
                                  "nothing was overwritten: inspect or remove them, or pass --config.resume=False "
                                  "to start afresh")
        return None

    def _set_aside(self, rounds: list[int], log=print) -> None:
        """Move corrupt checkpoints out of the manager's folder (kept for inspection). Several
        processes share the folder: process 0 moves, the others wait for it, all then reload."""
        if jax.process_index() == 0:
            dest = self.directory.rstrip("/") + "_corrupt"
            os.makedirs(dest, exist_ok=True)
            for r in rounds:
                src = os.path.join(self.directory, str(r))
                target = os.path.join(dest, f"{r}-{time.strftime('%Y%m%d-%H%M%S')}")
                if os.path.exists(src):
                    shutil.move(src, target)
                    log(f"moved the corrupt checkpoint of round {r} to {target}")
        distributed.barrier("comigs_jax:set_aside:" + ",".join(map(str, rounds)))
        self.manager.reload()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()  # orbax's threads end before an error line is printed (else a teardown traceback)
        return False

    def delete_all(self) -> None:
        for r in self.all_rounds():
            self.manager.delete(r)

    def close(self) -> None:
        """Wait for the save in flight, then end orbax's threads (even when the save failed)."""
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # orbax re-raises the same failed save
                self.manager.close()
            raise
        self.manager.close()


def _brief(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__
