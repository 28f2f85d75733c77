"""Federations as an array axis: F federations (seeds, lr, ...) of one config in ONE Simulation
equal F separate Simulations, each federation on its own (two programs: compared in float64,
tests/tiny.py TOL64)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.experiment.simulation import Simulation, check_federations
from comigs_jax.federated.aggregate import aggregate
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.sharding import single_device_mesh, users_mesh
from comigs_jax.train.state import TrainConfig
from tiny import TOL64, as_if_killed_after_round, assert_json_close, assert_mean_close, markov_users, tiny_base, tiny_cfg

TC = TrainConfig(rounds=2, local_steps=3, batch_size=4, seq_len=8, router_every=2, router_steps=2)
# every scalar that may differ between federations differs (comigs); Centralized: seeds only
FEDS = {"comigs": [{"seed": 0}, {"seed": 1, "lr": 1e-3, "lb_weight": 0.05, "router_lr": 5e-3, "weight_decay": 0.1}],
        "centralized": [{"seed": 0}, {"seed": 3}]}
TOL = TOL64


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _train(sim, seeds):
    """Two rounds; per round: metrics and the pre-aggregation evaluation; then the final params."""
    out = []
    for _ in range(sim.n_rounds):
        m = sim.run_round()
        ev = sim.evaluate(TEST, n_windows=4, batch=2, protocol="reference", seed=seeds)
        sim.aggregate()
        out.append((m, ev))
    return out


TRAIN, VALID, TEST = markov_users(3, 300, 0), markov_users(3, 150, 100), markov_users(3, 150, 200)


@pytest.mark.parametrize("method_name", ["comigs", "centralized"])
def test_federations_in_one_program_equal_separate_runs(method_name, x64):
    """2 federations of 3 users (CoMiGS: different seeds, lr, lb_weight, router_lr, weight_decay;
    2 of 3 users sampled per round), heterogeneous expert counts: one Simulation sharded over 4
    devices in chunks of 1 (6 rows padded to 8; Centralized: 2 pooled models, 4 rows) against 2
    one-device Simulations."""
    cfg = tiny_cfg(n_experts=3, dtype="float64")
    base = tiny_base(cfg)
    method, feds = get_method(method_name), FEDS[method_name]
    kw = dict(expert_counts=[2, 3, 3], participation=0.67 if method_name == "comigs" else 1.0)
    layout = Layout(3, users_mesh(jax.devices()[:4]), method.pooled_data, chunk=1, n_federations=2)
    sim = Simulation(cfg, TC, method, base, TRAIN, VALID, layout=layout, federations=feds, **kw)
    if method_name == "comigs":
        assert sim.n_padded == 8 and layout.model_chunk == 1
        assert set(sim.row_hparams) == {"lr", "router_lr", "lb_weight", "weight_decay"}
    stacked = _train(sim, [f["seed"] for f in feds])
    params = _flat(sim.states.params)
    per = sim.layout.models_per_federation
    for f, fed in enumerate(feds):
        tc = dataclasses.replace(TC, **{k: v for k, v in fed.items() if k != "seed"})
        one = Simulation(cfg, tc, method, base, TRAIN, VALID, seed=fed["seed"], **kw)
        ref = _train(one, fed["seed"])
        for r, ((m, ev), (m1, ev1)) in enumerate(zip(stacked, ref)):
            for k in m1:
                np.testing.assert_allclose(m[k][f], m1[k], **TOL, err_msg=f"federation {f} round {r} {k}")
            for k in ev1:
                np.testing.assert_allclose(ev[k][f], ev1[k], **TOL, err_msg=f"federation {f} round {r} eval {k}")
        for k, x in _flat(one.states.params).items():
            np.testing.assert_allclose(params[k][f * per:(f + 1) * per], x[:per], **TOL, err_msg=f"{f} {k}")


def test_one_federation_is_todays_program(x64):
    """federations=[{"seed": s}] is seed=s: the same program, bit for bit (the programs of the
    separate runs above: no new compile in the same process)."""
    cfg = tiny_cfg(n_experts=3, dtype="float64")
    base = tiny_base(cfg)
    kw = dict(expert_counts=[2, 3, 3])
    a = Simulation(cfg, TC, get_method("comigs"), base, TRAIN, VALID, seed=5, **kw)
    b = Simulation(cfg, TC, get_method("comigs"), base, TRAIN, VALID, federations=[{"seed": 5}], **kw)
    assert a._round is b._round and a._server is b._server
    for sim in (a, b):
        sim.run_round()
        sim.aggregate()
    for k, x in _flat(a.states.params).items():
        np.testing.assert_array_equal(_flat(b.states.params)[k], x)


def test_grouped_aggregation_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4, 2)).astype(np.float32)
    params = {"h_0": {"attn": {"c_attn": {"lora_A": x}}, "router": {"kernel": x}}}
    w = np.array([0.5, 0.0, 2.0, 1.0, 1.0, 3.0, 0.0], np.float32)
    groups = np.array([0, 0, 0, 1, 1, 2, 2])
    out = _flat(aggregate(jax.tree.map(jnp.asarray, params), jnp.asarray(w), ("attn",), groups=jnp.asarray(groups),
                          n_groups=3))
    for g in range(3):
        sel = groups == g
        assert_mean_close(out["h_0", "attn", "c_attn", "lora_A"][sel], x[sel], w[sel], err_msg=f"group {g}")
    np.testing.assert_array_equal(out["h_0", "router", "kernel"], x)
    # a group without weight (nobody uploaded) keeps its rows' leaves; the others average as before
    w0 = np.where(groups == 1, 0.0, w).astype(np.float32)
    out0 = _flat(aggregate(jax.tree.map(jnp.asarray, params), jnp.asarray(w0), ("attn",),
                           groups=jnp.asarray(groups), n_groups=3))["h_0", "attn", "c_attn", "lora_A"]
    np.testing.assert_array_equal(out0[groups == 1], x[groups == 1])
    np.testing.assert_array_equal(out0[groups != 1], out["h_0", "attn", "c_attn", "lora_A"][groups != 1])
    # one federation, no weight at all: unchanged (not NaN)
    alone = _flat(aggregate(jax.tree.map(jnp.asarray, params), jnp.zeros(7, jnp.float32), ("attn",)))
    np.testing.assert_array_equal(alone["h_0", "attn", "c_attn", "lora_A"], x)


def test_a_key_that_changes_shapes_is_refused():
    with pytest.raises(ValueError, match=r"^federation 1: 'seq_len' cannot differ .* allowed: seed, lr, router_lr, "
                                         r"lb_weight, weight_decay"):
        check_federations([{"seed": 0}, {"seed": 1, "seq_len": 16}])
    with pytest.raises(ValueError, match="layout.n_federations=1 for 2 federations"):
        Simulation(tiny_cfg(), TC, get_method("comigs"), tiny_base(tiny_cfg()), TRAIN, VALID,
                   layout=Layout(3, single_device_mesh()), federations=[{"seed": 0}, {"seed": 1}])


def test_stack_seeds_writes_the_separate_runs_folders(tiny_cache, tmp_path, x64):
    """experiments.run --config.seeds=0,7 --config.federation.stack_seeds=True: one program for
    both seeds, each seed's folder as its separate run writes it (seed 0's results are a one-seed
    run's; its checkpoints resume as a separate run's). Two programs: both in float64 (TOL64)."""
    import json
    import os

    from entrypoint import main as run
    # no figures: the results, checkpoints and metrics compared here do not depend on them (a run's
    # figures: test_run; a stacked run's: test_many_users), and drawing them was a third of the time
    f64 = ["--config=configs/tiny.py", "--config.model.dtype=float64", "--config.output.figures=False"]
    ref_wd = str(tmp_path / "seed0")
    p = run([*f64, f"--workdir={ref_wd}"], tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    wd = str(tmp_path / "stacked")
    args = [*f64, f"--workdir={wd}", "--config.seeds=0,7", "--config.federation.stack_seeds=True"]
    p = run(args, tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 seeds as one program" in p.stdout
    clean = lambda r: {k: v for k, v in r.items() if k not in ("speed", "provenance", "config")}
    load = lambda d: json.load(open(os.path.join(d, "results.json")))
    a, b = load(ref_wd), load(os.path.join(wd, "comigs_s0"))
    _close(clean(a), clean(b))
    for d in ("comigs_s0", "comigs_s7"):
        assert sorted(os.listdir(os.path.join(wd, d, "checkpoints"))) == ["2", "4"]
        rounds = [json.loads(l) for l in open(os.path.join(wd, d, "metrics.jsonl"))]
        assert [r["round"] for r in rounds] == [1, 2, 3, 4] and rounds[0]["stacked_seeds"] == [0, 7]
    # killed after round 2 of both seeds: the same command resumes both as one program from their
    # checkpoints, and ends where the uninterrupted run ended
    first = {d: load(os.path.join(wd, d)) for d in ("comigs_s0", "comigs_s7")}
    for d in first:
        as_if_killed_after_round(os.path.join(wd, d))
    p = run(args, tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[comigs s0,7] resumed from round 2" in p.stdout and "2 seeds as one program, rounds 3..4" in p.stdout
    for d, res in first.items():
        _close(clean(res), clean(load(os.path.join(wd, d))))


def _close(a, b):
    """Equal JSON trees, floats to TOL64 (one float64 program for two seeds vs one seed's)."""
    assert_json_close(b, a, TOL64["rtol"], TOL64["atol"])


def test_stacked_ranked_runs_resume_as_one_program(tiny_cache, tmp_path, capsys, x64):
    """HetLoRA with per-user ranks 2, 4, 3 and seeds 0, 1 stacked: each seed's checkpoint holds its
    own program's rows and ranks (its host state as a separate run's), and a run resumed from
    round 1 as one program ends where the uninterrupted one ended; so do runs that resume from
    different rounds (a corrupt checkpoint), each group as its own program (float64: TOL64)."""
    import json
    import os
    import shutil

    from comigs_jax import experiment
    from configs import tiny
    c = tiny.get_config("hetlora")
    c.update_from_flattened_dict({"output.figures": False, "train.rounds": 2, "checkpoint.every_rounds": 1,
                                  "model.ranks": "2,4,3", "seeds": "0,1", "federation.stack_seeds": True,
                                  "data.cache_dir": tiny_cache, "model.dtype": "float64"})
    wd = str(tmp_path / "wd")
    first = experiment.run(c, wd)
    for s in (0, 1):
        d = os.path.join(wd, f"hetlora_s{s}")
        meta = json.load(open(os.path.join(d, "checkpoints", "1", "meta", "metadata")))
        assert meta["host"]["ranks"][:3] == [2, 4, 3] and isinstance(meta["host"]["rng"], dict)
        shutil.rmtree(os.path.join(d, "checkpoints", "2"))
        os.remove(os.path.join(d, "results.json"))
    again = experiment.run(c, wd)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("speed", "provenance", "config")}
    for key, res in first.items():
        _close(strip(res), strip(again[key]))
    # seed 0's round-2 checkpoint corrupt, both results gone: seed 0 falls back to round 1 and
    # resumes alone; seed 1 (finished) writes its outputs from its checkpoint; both as before
    import glob
    for f in glob.glob(os.path.join(wd, "hetlora_s0", "checkpoints", "2", "state", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(7)
    for s in (0, 1):
        os.remove(os.path.join(wd, f"hetlora_s{s}", "results.json"))
    capsys.readouterr()
    third = experiment.run(c, wd)
    out = capsys.readouterr().out
    assert "falling back to round 1" in out and "[hetlora s0] resumed from round 1" in out
    assert "[hetlora s1] the run had finished; writing its outputs" in out
    for key, res in first.items():
        _close(strip(res), strip(third[key]))
