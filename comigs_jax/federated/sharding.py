"""The device mesh and shardings, declared once: users sharded over `users`, the base replicated."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

USERS = "users"


def users_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices with axis `users` (Auto axis type)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (USERS,), axis_types=(jax.sharding.AxisType.Auto,))


def user_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over users: for every leaf with a user axis."""
    return NamedSharding(mesh, P(USERS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_users(tree, mesh: Mesh):
    """Place a pytree whose leaves all have a leading user axis, split along `users`."""
    return jax.device_put(tree, user_sharded(mesh))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
