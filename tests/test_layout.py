"""The user layout, computed once: padding, rows per device and process, data to load, shardings."""
import jax
import numpy as np
import pytest

from comigs_jax.federated.layout import Layout, data_users, run_mesh
from comigs_jax.federated.sharding import single_device_mesh, users_mesh


def test_users_padded_to_the_devices_and_split_evenly():
    lay = Layout(12, users_mesh())
    assert jax.device_count() == 8
    assert (lay.n_devices, lay.n_models, lay.n_rows, lay.n_user_rows, lay.n_padding) == (8, 12, 16, 16, 4)
    np.testing.assert_array_equal(lay.real, np.arange(16) < 12)
    assert lay.local_rows == list(range(16)) and lay.data_users == list(range(12))  # one process holds all
    per_device = lay.rows_of_devices()
    assert sorted(map(len, per_device.values())) == [2] * 8
    assert sorted(r for rows in per_device.values() for r in rows) == list(range(16))
    x = lay.place(np.arange(16 * 3).reshape(16, 3))
    assert x.sharding == lay.users and x.addressable_shards[0].data.shape == (2, 3)


def test_pooled_model_has_one_row_but_scores_every_user():
    lay = Layout(5, users_mesh(), pooled=True)
    assert (lay.n_models, lay.n_rows, lay.n_user_rows) == (1, 8, 8)
    assert lay.real.sum() == 1 and lay.data_users == list(range(5))


def test_one_device_mesh_when_nothing_is_sharded():
    lay = Layout(3, single_device_mesh())
    assert (lay.n_devices, lay.n_rows, lay.n_padding, lay.sharded) == (1, 3, 0, False)
    assert Layout.build(3, shard=False).n_devices == 1
    assert Layout.build(3, mode="loop").n_devices == 1  # the loop mode never shards
    assert Layout.build(1).n_devices == 1  # one model: nothing to split
    assert Layout.build(3).n_devices == 8 and run_mesh(3).devices.size == 8


def test_union_of_the_users_every_method_needs():
    assert data_users([Layout(3, users_mesh()), Layout(3, users_mesh(), pooled=True)]) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one user"):
        Layout(0, users_mesh())


def test_data_for_no_user(tmp_path):
    """A process of a multi-host run whose devices hold only padding loads no user at all."""
    from comigs_jax.data import load_user_data
    from configs import tiny
    d = load_user_data(tiny.get_config().data, user_indices=[])
    assert (d.indices, d.train, d.vocab_size) == ([], [], 64)
