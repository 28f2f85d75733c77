"""Per-user LoRA ranks after a run (issue 18): restore (what `experiments.generate` and
`experiments.export` use) gives each user the model it trained, rank scale and HetLoRA's pruned
ranks applied, and an export round trip reproduces it."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from comigs_jax import configuration
from comigs_jax.experiment import export, restore
from comigs_jax.experiment.loop import layouts_of
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated.communication import shared_params_per_user
from comigs_jax.federated.ranks import apply_rank_scale, is_ranked, lora_scale
from comigs_jax.model import lm
from tiny import markov_users


def _logits(model_cfg, params, tokens, mask):
    return np.asarray(lm.language_model(model_cfg).apply({"params": params}, tokens, jnp.asarray(mask))[0])


def test_restored_and_exported_ranked_users_are_the_trained_models(tiny_cache, tmp_path):
    """A tiny HetLoRA run (1 round) with ranks 2, 4, 3 (padded rank 4): each restored user model
    equals Simulation.user_params (the trained model's view: A times s(r_i) / s(4) on its current
    rank, B masked) of a Simulation holding the checkpoint's rows and host state, differs from the
    raw rows, and the exported folder reproduces its logits; at HetLoRA-pruned host ranks too."""
    from comigs_jax import experiment
    from configs import tiny
    c = tiny.get_config("hetlora")
    c.output.figures = False
    c.train.rounds = 1
    c.model.ranks = "2,4,3"
    c.data.cache_dir = tiny_cache
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    run = restore.open_run(wd)
    res = json.load(open(os.path.join(run.run_dir, "results.json")))
    records = [json.loads(line) for line in open(os.path.join(run.run_dir, "metrics.jsonl"))]
    assert [r["expert_ranks"] for r in records] == [res["communication"]["final_ranks"]]
    per = shared_params_per_user(run.model_cfg, run.method.for_mode(False), [2, 2, 2], [2, 4, 3])
    assert res["communication"]["per_round_params"] == per.tolist() and len(set(per.tolist())) == 3
    rows, raw = restore.restore_rows(run), restore.restore_rows(run, model_view=False)
    host = _host_state(run)
    ranks = np.asarray(host["ranks"])
    assert ranks.tolist()[:3] <= [2, 4, 3] and all(ranks[:3] >= [1, 3, 2])  # HetLoRA cuts, never raises
    # the trained model: a Simulation of the run's method holding the checkpoint (raw rows, host ranks)
    tc = configuration.train_config(run.cfg)
    sim = Simulation(run.model_cfg, tc, run.method, run.base, markov_users(3, 200), markov_users(3, 100, 1),
                     ranks=[2, 4, 3], seed=0, layout=layouts_of(run.cfg, ["hetlora"])["hetlora"])
    sim.states = sim.states.replace(params=jax.tree.map(jnp.asarray, raw))
    sim.restore_host_states([host], sim.layout)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, run.model_cfg.vocab_size, (2, 12)))
    out = str(tmp_path / "exported")
    _export_cli(wd, out)
    lora = run.model_cfg.moe.lora
    for u, (user, r) in enumerate(zip(run.users, [2, 4, 3])):
        params, mask = run.user_params(user, rows)
        trained = jax.tree.map(np.asarray, sim.user_params(u))
        flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(trained)
        for k, x in want.items():
            np.testing.assert_allclose(flat[k], x, rtol=1e-6, atol=0, err_msg=str(k))
        # and by hand: A's components < current rank times s(r) / s(4), the rest 0
        for k, x in traverse_util.flatten_dict(raw).items():
            if is_ranked(k) and k[-1].endswith("_A"):
                cut = x[u][..., :ranks[u]] * (lora_scale(lora, r) / lora_scale(lora, 4))
                np.testing.assert_allclose(flat[k][..., :ranks[u]], cut, rtol=1e-6, err_msg=str(k))
                assert not np.any(flat[k][..., ranks[u]:])
        got = _logits(run.model_cfg, params, tokens, mask)
        raw_params, _ = run.user_params(user, raw)
        if r < 4:  # the rank scale changes the model
            assert np.abs(got - _logits(run.model_cfg, raw_params, tokens, mask)).max() > 1e-6
        model = export.load_exported(os.path.join(out, user))
        np.testing.assert_allclose(_logits(model.model_cfg, model.params, tokens, model.expert_mask), got,
                                   rtol=1e-5, atol=1e-5)
    # HetLoRA's cuts (this short run has none): restore's scales at pruned host ranks are the Simulation's
    pruned = {**host, "ranks": [1, 3, 2] + list(host["ranks"][3:])}
    sim.restore_host_states([pruned], sim.layout)
    scaled = apply_rank_scale(raw, restore.rank_scale_rows(run, pruned["ranks"], len(pruned["ranks"])))
    for u in range(3):
        want = traverse_util.flatten_dict(jax.tree.map(np.asarray, sim.user_params(u)))
        for k, x in traverse_util.flatten_dict(scaled).items():
            np.testing.assert_allclose(np.asarray(x)[u], want[k], rtol=1e-6, atol=0, err_msg=str(k))


def _export_cli(wd, out):
    import contextlib
    import io

    from experiments import export as export_cli
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = export_cli.main(["experiments.export", f"--workdir={wd}", "--all", f"--out={out}"])
    assert code == 0, err.getvalue()


def _host_state(run):
    import orbax.checkpoint as ocp
    mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(run.run_dir, "checkpoints")),
                                item_handlers={"meta": ocp.JsonCheckpointHandler()})
    try:
        return mgr.restore(mgr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["host"]
    finally:
        mgr.close()


def _np_count(model_cfg, method, ranks, n_shared_slots):
    """Shared parameters per user by slicing: each shared leaf, of a ranked (expert LoRA) factor
    only its first r_i components, of the specialist slots only the first n_shared_slots."""
    from comigs_jax.federated.roles import factor_of, role_of, slot_axis
    from comigs_jax.model.lm import param_shapes
    out = []
    for r in ranks:
        n = 0
        for p, s in traverse_util.flatten_dict(param_shapes(model_cfg)).items():
            if not method.is_shared(p):
                continue
            x = np.zeros(s.shape, np.int8)
            if role_of(p) == "specialist":
                x = np.take(x, np.arange(n_shared_slots), axis=slot_axis(p))
            if is_ranked(p):
                x = x[..., :r] if factor_of(p) == "A" else x[..., :r, :]
            n += x.size
        out.append(n)
    return np.array(out)


def test_communication_counts_each_users_rank():
    """Per-user ranks 2, 4, 3 (padded 4), users with 3, 3, 2 experts (1 generalist): each user's
    per-round count is a NumPy count of the components it has; HetLoRA's cuts over 3 rounds (user
    1 sits out round 1) count each upload at the rank it trained at and each download at the rank
    after the round's cut."""
    from comigs_jax.federated.communication import accounting
    from comigs_jax.federated.methods import configure_model, get_method
    from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, attn_lora=LoRAConfig(rank=2),
                     moe=MoEConfig(n_experts=3, n_generalists=1, top_k=2, lora=LoRAConfig(rank=4)))
    ranks, counts = [2, 4, 3], [3, 3, 2]
    for name in ("hetlora", "flexlora", "comigs"):
        m = get_method(name)
        mc = configure_model(cfg, m)
        got = shared_params_per_user(mc, m, counts, ranks)
        np.testing.assert_array_equal(got, _np_count(mc, m, ranks, 1), err_msg=name)
        np.testing.assert_array_equal(shared_params_per_user(mc, m, counts), _np_count(mc, m, [4] * 3, 1))
        assert len(set(got.tolist())) == 3, name  # the shared generalist is ranked: three ranks, three counts
    m = get_method("hetlora")
    mc = configure_model(cfg, m)
    after = [[2, 3, 3], [2, 3, 2], [1, 3, 2]]
    took = [[True, True, True], [True, False, True], [True, True, True]]
    a = accounting(mc, m, counts, 3, [3, 2, 3], ranks=ranks, round_ranks=after, round_taken=took)
    before = [ranks] + after[:-1]
    c = lambda rk: _np_count(mc, m, rk, 1)
    up = sum(c(b) * np.array(t) for b, t in zip(before, took))
    down = sum(c(x) for x in after)
    assert a["per_round_params"] == c(ranks).tolist() and a["final_ranks"] == after[-1]
    assert a["upload_params"] == up.tolist() and a["download_params"] == down.tolist()
    assert a["upload_rounds"] == [3, 2, 3] and a["download_rounds"] == [3] * 3
    assert a["upload_bytes_float32"] == (4 * up).tolist() and a["download_bytes_bfloat16"] == (2 * down).tolist()
