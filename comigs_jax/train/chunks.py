"""Users in chunks: a device's users processed C at a time inside one jitted program.

A round or an evaluation is a function of ONE user vmapped over the user axis. Vmapping it over
every user of a device keeps every user's activations alive at once; here the rows of each
device are split into chunks of C users, a `lax.scan` runs the chunks one after the other and a
vmap (axis `chunk`) runs the C users of a chunk together. The live activations are those of C
users; every user's state stays resident, split over the mesh's `users` axis as before, and is
updated in place (a scan carry written with dynamic-update-slices, so no second copy of it).

Shapes: a user-axis array [U, ...] with U = D * n * C (D devices, n chunks per device) becomes
[D, n, C, ...]: the outer axis is vmapped with spmd_axis_name `users` (one slice per device,
a local reshape), the middle one scanned, the inner one vmapped. comigs_jax.federated.layout
pads U so that C divides each device's rows.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from comigs_jax.federated.sharding import USERS

CHUNK = "chunk"


def split_rows(tree, n_devices: int, chunk: int):
    """[U, ...] leaves -> [D, U / (D C), C, ...]."""
    return jax.tree.map(lambda x: x.reshape(n_devices, -1, chunk, *x.shape[1:]), tree)


def merge_rows(tree):
    """[D, n, C, ...] leaves -> [D n C, ...] (the inverse of split_rows)."""
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[3:]), tree)


def _constrain(tree, mesh: Mesh):
    """Keep the device axis on `users`: the split is a reshape of each device's own block."""
    sharding = NamedSharding(mesh, P(USERS))
    return jax.tree.map(lambda x: lax.with_sharding_constraint(x, sharding), tree)


def scan_chunks(fn: Callable, carry, xs):
    """fn(carry_chunk, xs_chunk) -> (new carry_chunk, ys_chunk) over the chunks of one device.

    carry, xs: [n, C, ...] leaves; the carry is read and written one chunk at a time in place.
    Returns (carry [n, C, ...], ys [n, C, ...])."""
    n = jax.tree.leaves(xs)[0].shape[0]

    def body(carry, i):
        c = jax.tree.map(lambda a: a[i], carry)
        new, ys = fn(c, jax.tree.map(lambda a: a[i], xs))
        return jax.tree.map(lambda a, b: a.at[i].set(b), carry, new), ys

    return lax.scan(body, carry, jnp.arange(n))


def chunked(fn: Callable, mesh: Mesh, chunk: int):
    """fn(shared, carry_chunk, xs_chunk) -> (carry_chunk, ys_chunk) on [C, ...] leaves, as a
    function of (shared, carry [U, ...], xs [U, ...]) -> (carry [U, ...], ys [U, ...]).

    `shared` has no user axis (the base); collectives inside fn may name the axes (`users`,
    `chunk`): `users` spans the devices, `chunk` the users of the chunk."""
    n_devices = int(mesh.devices.size)

    def per_device(shared, carry, xs):
        return scan_chunks(lambda c, x: fn(shared, c, x), carry, xs)

    def run(shared, carry, xs):
        carry, xs = _constrain(split_rows((carry, xs), n_devices, chunk), mesh)
        out = jax.vmap(per_device, in_axes=(None, 0, 0), axis_name=USERS, spmd_axis_name=USERS)(shared, carry, xs)
        return merge_rows(out)

    return run
