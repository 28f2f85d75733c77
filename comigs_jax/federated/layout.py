"""Where the users of a federation live, computed once and asked by everything else.

    layout = Layout.build(n_users=12, pooled=False, mesh=users_mesh())   # 8 devices
    layout.n_rows          # 16: users padded to a multiple of the device count
    layout.real            # [16] bool: rows 12..15 are padding (masked out of aggregation)
    layout.local_rows      # the model rows on this process's devices
    layout.data_users      # the users whose data this process must load
    Layout.build(n_users=12, chunk=4, ...).model_chunk   # 2: each device's 2 users in one chunk

Two user axes exist. The *model* axis holds one row per trained model (every user, or
Centralized's one pooled model); the *user* axis holds one row per user (evaluation scores every
user, whatever the method). Both are padded to a multiple of the mesh size and split over the
mesh's `users` axis, so a process holds a contiguous block of each. The mesh is always a mesh:
one device when nothing is sharded.

`chunk` (config `train.user_chunk`): each device's rows are processed `chunk` at a time
(comigs_jax.train.chunks), so that only a chunk's activations are alive at once. 0, or a chunk
of at least a device's rows, means all of them at once. A chunk that does not divide a device's
rows pads the axis further, to a multiple of devices x chunk: the padding rows are masked like
the device padding (no aggregation weight, not counted, dropped from every output).
Centralized's one pooled model is never chunked on the model axis.

`n_federations` F > 1 (independent federations of one config, e.g. seeds, in one program): both
axes hold the federations one after the other, rows f * M + u for federation f's model (or user)
u, padded at the end only; `federation_of_rows` says which federation each row belongs to
(padding rows: the last one), and aggregation averages within it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from comigs_jax.federated import sharding
from comigs_jax.federated.users import device_chunk, padded_user_count, real_user_mask


def run_mesh(n_models: int, *, shard: bool = True, mode: str = "vmap") -> Mesh:
    """The mesh a run uses: every device of every process when users are sharded, else one device.

    Several processes always shard (that is how each holds only its own users); one process
    shards when asked, in the vmapped mode, with more than one model and more than one device."""
    if jax.process_count() > 1 or (shard and mode == "vmap" and n_models > 1 and jax.device_count() > 1):
        return sharding.users_mesh()
    return sharding.single_device_mesh()


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Users of one federation on one mesh. n_users: real users; pooled: one model trained on
    every user's data (Centralized) instead of one per user."""

    n_users: int
    mesh: Mesh
    pooled: bool = False
    chunk: int = 0
    n_federations: int = 1

    def __post_init__(self):
        if self.n_users < 1:
            raise ValueError(f"n_users={self.n_users}: at least one user is needed")
        if not isinstance(self.n_federations, (int, np.integer)) or self.n_federations < 1:
            raise ValueError(f"n_federations={self.n_federations!r}: must be an integer >= 1")
        if not isinstance(self.chunk, (int, np.integer)) or self.chunk < 0:
            raise ValueError(f"user_chunk={self.chunk!r}: must be an integer >= 0 (0 = all of a device's users at once)")

    @classmethod
    def build(cls, n_users: int, *, pooled: bool = False, mesh: Mesh | None = None, shard: bool = True,
              mode: str = "vmap", chunk: int = 0, n_federations: int = 1) -> "Layout":
        """The layout on `mesh`, or on the mesh a run would choose (`run_mesh`)."""
        n_models = (1 if pooled else n_users) * n_federations
        return cls(n_users, mesh if mesh is not None else run_mesh(n_models, shard=shard, mode=mode), pooled,
                   chunk, n_federations)

    # ------------------------------------------------------------------ sizes
    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def models_per_federation(self) -> int:
        """Models one federation trains: one per user, or one pooled model."""
        return 1 if self.pooled else self.n_users

    @property
    def n_models(self) -> int:
        """Models trained, every federation's."""
        return self.models_per_federation * self.n_federations

    @property
    def n_user_total(self) -> int:
        """Real rows of the user axis: every federation's users."""
        return self.n_users * self.n_federations

    @property
    def model_chunk(self) -> int:
        """Model rows per chunk on each device (0: all at once)."""
        return 0 if self.pooled else device_chunk(self.n_models, self.n_devices, self.chunk)

    @property
    def user_chunk(self) -> int:
        """User rows per chunk on each device, for evaluation (0: all at once)."""
        return device_chunk(self.n_user_total, self.n_devices, self.chunk)

    @property
    def n_rows(self) -> int:
        """Rows of the model axis (models padded to a multiple of devices x chunk)."""
        return padded_user_count(self.n_models, self.n_devices * max(self.model_chunk, 1))

    @property
    def n_user_rows(self) -> int:
        """Rows of the user axis (users padded to a multiple of devices x chunk)."""
        return padded_user_count(self.n_user_total, self.n_devices * max(self.user_chunk, 1))

    def federation_of_rows(self, user_axis: bool = False) -> np.ndarray:
        """[rows] int32: the federation of each row of the model axis (or the user axis); padding
        rows count as the last federation's (they weigh nothing)."""
        per = self.n_users if user_axis else self.models_per_federation
        n = self.n_user_rows if user_axis else self.n_rows
        return np.minimum(np.arange(n) // per, self.n_federations - 1).astype(np.int32)

    def index_of_rows(self, user_axis: bool = False) -> np.ndarray:
        """[rows] int: each row's model (or user) index within its federation (padding rows:
        past the last one)."""
        per = self.n_users if user_axis else self.models_per_federation
        n = self.n_user_rows if user_axis else self.n_rows
        return np.arange(n) - self.federation_of_rows(user_axis) * per

    @property
    def init_rows_per_federation(self) -> int:
        """Rows each federation initialises from its own key: every row with one federation (its
        padding rows included, as a run alone), its models with several (padding rows then copy
        row 0)."""
        return self.n_rows if self.n_federations == 1 else self.models_per_federation

    def outputs(self, x):
        """A per-real-row output [F * n, ...] as a caller sees it: [n, ...] for one federation (a
        run alone), [F, n, ...] for several."""
        return x if self.n_federations == 1 else self.by_federation(x)

    def by_federation(self, x):
        """[F * n, ...] -> [F, n, ...], whatever F."""
        return x.reshape(self.n_federations, -1, *x.shape[1:])

    @property
    def n_padding(self) -> int:
        return self.n_rows - self.n_models

    @property
    def real(self) -> np.ndarray:
        """[n_rows] bool: real models (False: padding rows, which weigh nothing)."""
        return real_user_mask(self.n_models, self.n_rows)

    @property
    def sharded(self) -> bool:
        return self.n_devices > 1

    # ------------------------------------------------------------------ placement
    @functools.cached_property
    def local_rows(self) -> list[int]:
        """Model rows on this process's devices (contiguous)."""
        return sharding.local_user_rows(self.mesh, self.n_rows)

    @functools.cached_property
    def local_user_rows(self) -> list[int]:
        """User rows on this process's devices (contiguous)."""
        return sharding.local_user_rows(self.mesh, self.n_user_rows)

    def rows_of_devices(self, user_axis: bool = False) -> dict[str, list[int]]:
        """{device: rows it holds} for this process's devices (model axis, or the user axis)."""
        n = self.n_user_rows if user_axis else self.n_rows
        index_map = self.users.addressable_devices_indices_map((n,))
        return {str(d): list(range(*idx[0].indices(n))) for d, idx in index_map.items()}

    @functools.cached_property
    def data_users(self) -> list[int]:
        """The real users whose data this process loads: those of its model rows (every user, for
        the pooled model's row) and of its user rows (each process scores its own users' test
        splits). May be empty: a process whose devices hold only padding rows."""
        mine = {r % self.n_users for r in self.local_user_rows if r < self.n_user_total}
        if self.pooled:
            if any(r < self.n_models for r in self.local_rows):
                mine |= set(range(self.n_users))
        else:
            mine |= {r % self.n_users for r in self.local_rows if r < self.n_models}
        return sorted(mine)

    # ------------------------------------------------------------------ shardings
    @property
    def users(self) -> NamedSharding:
        """Leading axis split over `users`."""
        return sharding.user_sharded(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return sharding.replicated(self.mesh)

    def place(self, local_block, user_axis: bool = False):
        """A global [rows, ...] array split over `users` from this process's rows only
        (`local_block` [len(local_rows), ...], or the user axis's rows)."""
        return sharding.global_user_array(self.mesh, local_block, self.n_user_rows if user_axis else self.n_rows)


def data_users(layouts) -> list[int]:
    """The users whose data this process loads for every layout given (one per method)."""
    return sorted(set().union(*(lay.data_users for lay in layouts)))
