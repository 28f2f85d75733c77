"""Users in chunks: a device's users processed C at a time inside one jitted program.

A round or an evaluation is a function of ONE user vmapped over the user axis. Vmapping it over
every user of a device keeps every user's activations alive at once; here each device's rows are
processed in chunks of C users: a `shard_map` over the mesh's `users` axis gives each device its
own rows [R, ...], a `lax.scan` runs the R / C chunks one after the other, and a vmap (axis
`chunk`) runs the C users of a chunk together. The live activations are those of C users; every
user's state stays resident, split over `users` as before, and is updated in place: each chunk
is read with a dynamic slice of the device's rows and written back with a dynamic-update-slice
of the scan carry. (Reshaping the rows to [n, C, ...] instead makes XLA:CPU copy every state
leaf that has a size-1 axis in and out of the loop: temporaries that grow with U.)

comigs_jax.federated.layout pads the rows so that C divides each device's share.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from comigs_jax.federated.sharding import USERS

CHUNK = "chunk"


def scan_chunks(fn: Callable, carry, xs, chunk: int):
    """fn(carry_chunk, xs_chunk) -> (new carry_chunk, ys_chunk) over the chunks of one device.

    carry, xs: [R, ...] leaves (R a multiple of chunk); the carry is read and written one chunk
    [chunk, ...] at a time, in place. Returns (carry [R, ...], ys [R, ...])."""
    rows = jax.tree.leaves(xs)[0].shape[0]

    def body(carry, i):
        take = lambda a: lax.dynamic_slice_in_dim(a, i * chunk, chunk, 0)
        new, ys = fn(jax.tree.map(take, carry), jax.tree.map(take, xs))
        put = lambda a, b: lax.dynamic_update_slice_in_dim(a, b, i * chunk, 0)
        return jax.tree.map(put, carry, new), ys

    carry, ys = lax.scan(body, carry, jnp.arange(rows // chunk))        # ys [R / C, C, ...]
    return carry, jax.tree.map(lambda y: y.reshape(rows, *y.shape[2:]), ys)


def chunked(fn: Callable, mesh: Mesh, chunk: int):
    """fn(shared, carry_chunk, xs_chunk) -> (carry_chunk, ys_chunk) on [C, ...] leaves, as a
    function of (shared, carry [U, ...], xs [U, ...]) -> (carry [U, ...], ys [U, ...]), the user
    axis split over the mesh's `users` axis.

    `shared` has no user axis (the base, replicated); collectives inside fn may name the axes
    `users` (across devices) and `chunk` (the users of the chunk)."""

    def per_device(shared, carry, xs):
        return scan_chunks(lambda c, x: fn(shared, c, x), carry, xs, chunk)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(USERS), P(USERS)),
                         out_specs=(P(USERS), P(USERS)), check_vma=False)
