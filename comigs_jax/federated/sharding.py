"""The device mesh and shardings, declared once: users sharded over `users`, the base replicated."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

USERS = "users"


def users_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices with axis `users` (Auto axis type).
    `single_device_mesh()` is the mesh of a run that shards nothing.

    Devices are ordered by process, so that every process holds one contiguous block of users
    (what lets each process load only its own users' data)."""
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (USERS,), axis_types=(jax.sharding.AxisType.Auto,))


def single_device_mesh() -> Mesh:
    """A one-device `users` mesh (this process's first device): nothing is split."""
    return users_mesh(jax.local_devices()[:1])


def local_user_rows(mesh: Mesh, n_rows: int) -> list[int]:
    """The rows of a [n_rows, ...] user-sharded array that live on this process's devices."""
    index_map = user_sharded(mesh).addressable_devices_indices_map((n_rows,))
    rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(n_rows))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise RuntimeError(f"this process's users are not contiguous: {rows}")
    return rows


def global_user_array(mesh: Mesh, local_rows, n_rows: int):
    """A global [n_rows, ...] array split over `users` from this process's rows only
    (`local_rows` [len(local_user_rows), ...]); no process holds another's users."""
    local_rows = np.asarray(local_rows)
    return jax.make_array_from_process_local_data(user_sharded(mesh), local_rows,
                                                  (n_rows,) + local_rows.shape[1:])


def user_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over users: for every leaf with a user axis."""
    return NamedSharding(mesh, P(USERS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
