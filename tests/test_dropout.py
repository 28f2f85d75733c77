"""Study f's drop-outs (federation.dropout): a participating user that stops at a random local step
keeps the steps it made and does not take part in that round's aggregation."""
import dataclasses

import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.roles import role_of
from comigs_jax.train.state import TrainConfig
from tiny import TOL64, markov_users, tiny_base, tiny_cfg

TC = TrainConfig(rounds=2, local_steps=3, batch_size=4, seq_len=8, router_every=2, router_steps=1)
N = 3


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _seed_with_one_dropout(p, steps=TC.local_steps):
    """A seed whose first round (participation 1: the only draws are the drop-outs') drops exactly
    user 0, after 1 <= s < steps steps: the draws of Simulation.sample_dropouts."""
    for seed in range(1000):
        rng = np.random.default_rng(seed + 1)
        drop, stop = rng.random(N) < p, rng.integers(0, steps, N)
        if list(drop) == [True, False, False] and 1 <= stop[0] < steps:
            return seed, int(stop[0])
    raise AssertionError("no seed")


@pytest.fixture(scope="module")
def setup(x64_module):
    """Every test here compares two programs (drop-outs against shorter runs, vmap against chunks
    and loops): in float64, tests/tiny.py TOL64."""
    cfg = tiny_cfg(dtype="float64")
    return cfg, tiny_base(cfg), markov_users(N, 400, 0), markov_users(N, 200, 100)


def test_dropped_user_keeps_its_first_steps_and_weighs_nothing(setup):
    cfg, base, train, valid = setup
    method = get_method("comigs")
    seed, s = _seed_with_one_dropout(0.5)
    sim = Simulation(cfg, TC, method, base, train, valid, seed=seed, dropout=0.5)
    sim.run_round()
    np.testing.assert_array_equal(sim.steps_made, [s, 3, 3])
    np.testing.assert_array_equal(sim.active, [False, True, True])
    np.testing.assert_array_equal(np.asarray(sim.states.step), [s, 3, 3])
    trained = _flat(sim.states.params)
    # The same run one step per round (the same schedule over rounds x steps, the same batches and
    # router phases, both keyed by the step counter): user 0 after s rounds, the others after 3.
    ref = Simulation(cfg, dataclasses.replace(TC, rounds=TC.rounds * 3, local_steps=1), method, base, train,
                     valid, seed=seed)
    for r in range(3):
        ref.run_round()
        if r + 1 == s:
            at_s = _flat(ref.states.params)
    full = _flat(ref.states.params)
    for k in trained:  # two programs compiled apart, in float64
        np.testing.assert_allclose(trained[k][0], at_s[k][0], **TOL64, err_msg=str(k))
        np.testing.assert_allclose(trained[k][1:], full[k][1:], **TOL64, err_msg=str(k))
    sim.aggregate()  # the shared leaves: the mean of users 1 and 2 only, received by all
    after = _flat(sim.states.params)
    gen = [k for k in after if method.is_shared(k)]
    assert any(role_of(k) == "generalist" for k in gen)
    for k in gen:
        mean = trained[k][1:].mean(0)
        for u in range(N):
            np.testing.assert_allclose(after[k][u], mean, **TOL64, err_msg=str(k))


def test_dropout_zero_is_the_program_without_dropouts(setup):
    cfg, base, train, valid = setup
    a = Simulation(cfg, TC, get_method("comigs"), base, train, valid, seed=0)
    b = Simulation(cfg, TC, get_method("comigs"), base, train, valid, seed=0, dropout=0.0)
    assert a._round is b._round
    rng_before = b._rngs[0].bit_generator.state
    a.run_round(); b.run_round()
    assert b._rngs[0].bit_generator.state == rng_before  # dropout 0 draws nothing
    np.testing.assert_array_equal(b.steps_made, [3, 3, 3])
    for (k, x), y in zip(_flat(a.states.params).items(), _flat(b.states.params).values()):
        np.testing.assert_array_equal(x, y, err_msg=str(k))


def test_dropout_is_validated():
    from comigs_jax import configuration
    from comigs_jax.errors import ConfigError
    from configs import tiny
    c = tiny.get_config("comigs")
    c.federation.dropout = 1.0
    with pytest.raises(ConfigError, match=r"^config.federation.dropout=1.0 is not allowed: in \[0, 1\)"):
        configuration.validate(c)
    c = tiny.get_config("pcl")
    c.federation.dropout = 0.2
    with pytest.raises(ConfigError, match=r"^config.federation.dropout=0.2 is not allowed: 0 for method pcl"):
        configuration.validate(c)
    with pytest.raises(ValueError, match="dropout=-0.1"):
        Simulation(tiny_cfg(), TC, get_method("comigs"), None, [np.zeros(20)], [np.zeros(20)], dropout=-0.1)


def test_dropouts_agree_across_vmap_chunks_loop_and_loop_step(setup):
    """One round with user 0 dropping out: all users at once = chunks of 2 with a padding row =
    the per-user Python loop = the reference-structured loop of single steps (rounds.loop_step_round)."""
    import jax
    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.sharding import single_device_mesh
    from comigs_jax.train.rounds import loop_step_round
    cfg, base, train, valid = setup
    method = get_method("comigs")
    seed, s = _seed_with_one_dropout(0.5)
    out = {}
    for name, kw in (("vmap", {}), ("chunks", {"layout": Layout(N, single_device_mesh(), chunk=2)}),
                     ("loop", {"mode": "loop"})):
        sim = Simulation(cfg, TC, method, base, train, valid, seed=seed, dropout=0.5, **kw)
        if name == "vmap":  # the single-step loop from the same start and step counts
            made = sim.sample_dropouts(np.ones(N, bool))
            assert list(made) == [s, 3, 3]
            states, _ = loop_step_round(sim.model_cfg, sim.tc, sim.method, 3)(
                sim.base, sim.states, sim.data, sim.masks_dev, jax.numpy.asarray(made))
            out["loop_step"] = _flat(states.params)
            sim._rngs[0].bit_generator.state = np.random.default_rng(seed + 1).bit_generator.state
        sim.run_round()
        assert list(sim.steps_made[:N]) == [s, 3, 3]
        out[name] = {k: v[:N] for k, v in _flat(sim.states.params).items()}
    for name in ("chunks", "loop", "loop_step"):
        for k in out["vmap"]:
            np.testing.assert_allclose(out[name][k], out["vmap"][k], **TOL64, err_msg=f"{name} {k}")


def test_a_federation_whose_users_all_dropped_out_keeps_its_leaves(setup):
    """Nobody uploaded (every participant dropped out): no mean over no one (0 / 0 made the run's
    parameters NaN); with two federations, only the one that had uploads averages."""
    cfg, base, train, valid = setup
    sim = Simulation(cfg, TC, get_method("fedavg"), base, train, valid, seed=0,
                     federations=[{"seed": 0}, {"seed": 1}])
    sim.run_round()
    before = _flat(sim.states.params)
    sim.active[:] = False
    sim.aggregate()
    after = _flat(sim.states.params)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    sim.active[:N] = True  # federation 0 uploads, federation 1 (rows N..2N-1) does not
    sim.aggregate()
    after = _flat(sim.states.params)
    for k, x in after.items():
        assert np.isfinite(x).all(), k
        np.testing.assert_array_equal(x[N:2 * N], before[k][N:2 * N], err_msg=str(k))
        if role_of(k) == "attn":  # fedavg's shared leaves: federation 0's mean on each of its rows
            np.testing.assert_allclose(x[:N], np.broadcast_to(before[k][:N].mean(0), x[:N].shape), **TOL64)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_sit_out_train_trains_every_user_and_averages_only_the_uploads(setup, dropout):
    """federation.sit_out="train": a user that does not participate makes all its local steps (the
    same steps, on the same keys, as at participation 1) and does not upload; the shared leaves are
    the mean over the users that participated and finished."""
    cfg, base, train, valid = setup
    method = get_method("comigs")
    sim = Simulation(cfg, TC, method, base, train, valid, seed=3, participation=0.34, dropout=dropout,
                     sit_out="train")
    full = Simulation(cfg, TC, method, base, train, valid, seed=3)
    sim.run_round(); full.run_round()
    uploads = np.asarray(sim.active)
    assert uploads.sum() <= 1 and sim.trained.sum() >= N - 1  # 1 of 3 participates; the others train
    dropped = ~uploads & (sim.steps_made < TC.local_steps)
    trained, ref = _flat(sim.states.params), _flat(full.states.params)
    done = ~dropped  # users that made all 3 steps: what participation 1 made, two programs in float64
    for k in trained:
        np.testing.assert_allclose(trained[k][done], ref[k][done], **TOL64, err_msg=str(k))
    sim.aggregate()
    after = _flat(sim.states.params)
    for k in (k for k in after if method.is_shared(k)):
        want = trained[k][uploads].mean(0) if uploads.any() else trained[k]  # nobody uploaded: rows keep theirs
        np.testing.assert_allclose(after[k], np.broadcast_to(want, after[k].shape), **TOL64, err_msg=str(k))
    for k in (k for k in after if not method.is_shared(k)):  # local leaves: what each user trained
        np.testing.assert_array_equal(after[k], trained[k], err_msg=str(k))


def test_sit_out_skip_is_todays_program_and_unknown_values_are_refused(setup):
    cfg, base, train, valid = setup
    a = Simulation(cfg, TC, get_method("comigs"), base, train, valid, seed=3, participation=0.34)
    b = Simulation(cfg, TC, get_method("comigs"), base, train, valid, seed=3, participation=0.34, sit_out="skip")
    a.run_round(); b.run_round()
    np.testing.assert_array_equal(a.active, b.active)
    np.testing.assert_array_equal(b.steps_made, np.where(b.active, TC.local_steps, 0))
    for (k, x), y in zip(_flat(a.states.params).items(), _flat(b.states.params).values()):
        np.testing.assert_array_equal(x, y, err_msg=str(k))
    from comigs_jax import configuration
    from comigs_jax.errors import ConfigError
    from configs import tiny
    c = tiny.get_config("comigs")
    c.federation.sit_out = "idle"
    with pytest.raises(ConfigError, match=r"^config.federation.sit_out='idle' is not allowed: skip \| train$"):
        configuration.validate(c)
