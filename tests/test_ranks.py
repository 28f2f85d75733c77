"""Per-user LoRA ranks in one program, HetLoRA and FlexLoRA (issue 18 items 1-3): each server rule
and the pruning regulariser against NumPy versions of method.md §7's formulas (zero tails, ranks
that shrink, clean vs reference scales), and heterogeneous ranks in one program equal to
separate programs per rank."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.ranks import (aggregate_ranked, last_in_group, lora_scale, prune_rank, pruning_penalty,
                                        rank_scales, safe_norm)
from comigs_jax.model.config import LoRAConfig
from comigs_jax.train.state import TrainConfig
from tiny import TOL64, markov_users, tiny_base, tiny_cfg

R, D_IN, D_OUT = 4, 5, 6
LORA = LoRAConfig(rank=R, alpha=16.0)


def _stack(ranks, seed=0, tiny_tail=()):
    """Stacked params of users with `ranks` (zero beyond), one layer's fc and proj of one expert;
    users in tiny_tail get a tail component 1e-3 times smaller."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (i, o) in (("fc", (D_IN, D_OUT)), ("proj", (D_OUT, D_IN))):
        a, b = rng.standard_normal((len(ranks), 1, i, R)), rng.standard_normal((len(ranks), 1, R, o))
        for u, r in enumerate(ranks):
            a[u, ..., r:], b[u, ..., r:, :] = 0, 0
            if u in tiny_tail:
                q = prune_rank(r)
                a[u, ..., q:r] *= 1e-3
        out[("h_0", "mlp", "specialists", f"{name}_A")] = a.astype(np.float32)
        out[("h_0", "mlp", "specialists", f"{name}_B")] = b.astype(np.float32)
    return out


def _run(flat, rule, weights, ranks, n_tokens=None, form=None, back=None):
    u = len(ranks)
    ranks = jnp.asarray(ranks, jnp.int32)
    scale = jnp.asarray(rank_scales(np.asarray(ranks), np.asarray(ranks), LORA, R))
    ones = jnp.ones(u, jnp.float32)
    out, new = aggregate_ranked(traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}),
                                jnp.asarray(weights, jnp.float32),
                                jnp.asarray(n_tokens if n_tokens is not None else weights, jnp.float32), ranks, scale,
                                ones if form is None else jnp.asarray(form, jnp.float32),
                                ones if back is None else jnp.asarray(back, jnp.float32), rule=rule,
                                is_shared=lambda p: True, n_shared_specialists=None,
                                groups=jnp.zeros(u, jnp.int32), n_groups=1)
    return {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(out).items()}, np.asarray(new)


def _fro(x):
    return np.sqrt((x.astype(np.float64) ** 2).sum(axis=(-2, -1)))


def test_safe_norm_and_pruning_penalty_match_numpy_with_zero_gradient_at_zero():
    g = jax.grad(lambda x: safe_norm(x, (-2, -1)).sum())(jnp.zeros((2, 3, 4)))
    assert np.all(np.isfinite(g)) and not np.any(g)
    flat = _stack([4])
    params = traverse_util.unflatten_dict({k: jnp.asarray(v[0]) for k, v in flat.items()})
    q = prune_rank(4)
    want = sum(_fro(flat[("h_0", "mlp", "specialists", f"{n}_A")][0][..., q:4])
               * _fro(flat[("h_0", "mlp", "specialists", f"{n}_B")][0][..., q:4, :]) for n in ("fc", "proj")).sum()
    np.testing.assert_allclose(float(pruning_penalty(params, q, 4)), want, rtol=1e-5)
    assert float(pruning_penalty(params, q, 4, jnp.zeros(1, bool))) == 0  # an absent expert counts 0
    # B = 0 (every run's step 1): a finite zero gradient, not NaN
    zero_b = jax.tree_util.tree_map_with_path(lambda p, x: x * 0 if p[-1].key.endswith("_B") else x, params)
    grads = jax.grad(lambda p: pruning_penalty(p, q, 4))(zero_b)
    assert all(np.all(np.isfinite(x)) and not np.any(x) for x in jax.tree.leaves(grads))
    assert [prune_rank(r) for r in (8, 16, 32, 100)] == [7, 15, 31, 99]


def test_masked_mean_gives_masked_components_no_weight():
    ranks, w = [2, 4, 3], np.array([1.0, 2.0, 0.0])
    flat = _stack(ranks)
    out, new = _run(flat, "mean", w, ranks)
    np.testing.assert_array_equal(new, ranks)
    for k, x in flat.items():
        ax = -1 if k[-1].endswith("_A") else -2
        m = (np.arange(R) < np.array(ranks)[:, None]).astype(np.float64)          # [U, R]
        shape = [len(ranks), 1, 1, 1]
        shape[ax] = R
        wm = (w[:, None] * m).reshape(shape)
        mean = (wm * x).sum(0) / np.where(wm.sum(0) > 0, wm.sum(0), 1)
        np.testing.assert_allclose(out[k], mean[None] * m.reshape(shape), rtol=1e-5, atol=1e-6, err_msg=str(k))


@pytest.mark.parametrize("reference, n", [(False, [300.0, 100.0, 200.0]), (True, [300.0, 100.0, 200.0]),
                                          (True, [300.0, 100.0, 0.0])])
def test_flexlora_rule_matches_numpy_clean_and_reference(reference, n):
    """Clean: the SVD of the token-weighted mean of s(r_i) A_i B_i. Reference: of the last
    uploading user's (n_U / sum n) (16 / r_U) A_U B_U alone (D3; user 1 when user 2 sat out),
    split with 16 / r_max (D3b)."""
    ranks, n = [2, 4, 3], np.array(n)
    full = np.array(ranks)
    s = np.array([lora_scale(LORA, r) for r in ranks])
    form = 16.0 / full if reference else s                 # D3b: merge_rate 16/r_i ...
    back = np.full(3, 16.0 / R) if reference else s        # ... and _svd's 16/r_max
    rule = "flexlora_reference" if reference else "flexlora"
    flat = _stack(ranks, seed=2)
    out, new = _run(flat, rule, np.ones(3), ranks, n_tokens=n, form=form, back=back)
    np.testing.assert_array_equal(new, ranks)
    last = np.flatnonzero(n > 0)[-1]
    for name in ("fc", "proj"):
        ka, kb = ("h_0", "mlp", "specialists", f"{name}_A"), ("h_0", "mlp", "specialists", f"{name}_B")
        dw = np.einsum("u...ir,u...ro->u...io", flat[ka].astype(np.float64), flat[kb]) * form[:, None, None, None]
        mean = n[last] * dw[last] / n.sum() if reference else (n[:, None, None, None] * dw).sum(0) / n.sum()
        uu, ss, vt = np.linalg.svd(mean[0], full_matrices=False)
        for i, r in enumerate(ranks):
            assert not np.any(out[ka][i][..., r:]) and not np.any(out[kb][i][..., r:, :])  # zero tails
            np.testing.assert_allclose(out[ka][i][0] @ out[kb][i][0], (uu[:, :r] * ss[:r]) @ vt[:r] / back[i],
                                       rtol=1e-4, atol=1e-5)
    # D3b end to end: with user j alone weighted, user i's model update s(r_i) A_i B_i is the rank-r_i
    # truncation of user j's s(r_j) A_j B_j times r_max / sqrt(r_i r_j) (1 in clean mode)
    j = 0
    out, _ = _run(flat, rule, np.ones(3), ranks, n_tokens=np.eye(3)[j], form=form, back=back)
    ka, kb = ("h_0", "mlp", "specialists", "fc_A"), ("h_0", "mlp", "specialists", "fc_B")
    dw_j = s[j] * flat[ka][j][0].astype(np.float64) @ flat[kb][j][0]
    for i, r in enumerate(ranks):
        uu, ss, vt = np.linalg.svd(dw_j, full_matrices=False)
        factor = R / np.sqrt(ranks[i] * ranks[j]) if reference else 1.0
        np.testing.assert_allclose(s[i] * out[ka][i][0] @ out[kb][i][0], factor * (uu[:, :r] * ss[:r]) @ vt[:r],
                                   rtol=1e-4, atol=1e-5)
    assert get_method("flexlora").for_mode(True).server == "flexlora_reference"
    # nobody uploaded: no rule averages over no one; every leaf stays as it was
    for r in ("mean", rule):  # HetLoRA's servers: tests/test_servers.py
        out0, new0 = _run(flat, r, np.zeros(3), ranks, n_tokens=np.zeros(3), form=form, back=back)
        np.testing.assert_array_equal(new0, ranks)
        for k, x in flat.items():
            np.testing.assert_array_equal(out0[k], x, err_msg=f"{r} {k}")
    # D3 per federation: each group's last row with weight
    w, g = np.array([1, 0, 2, 0, 0, 0, 3, 5, 0]), np.array([0, 0, 1, 1, 2, 2, 3, 3, 3])
    want = [True, False, True, False, False, False, False, True, False]  # group 2: nobody uploaded
    assert np.asarray(last_in_group(jnp.asarray(w, jnp.float32), jnp.asarray(g), 4)).tolist() == want
    assert get_method("flexlora").for_mode(False).server == "flexlora"


def _cfg(rank, dtype="float32"):
    cfg = tiny_cfg(n_experts=1, n_generalists=0, top_k=1, dtype=dtype)
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, lora=LoRAConfig(rank=rank)))


def test_heterogeneous_ranks_in_one_program_equal_separate_programs_per_rank(x64):
    """Users of ranks 2 and 4 in one rank-4 program train (with the pruning regulariser) and
    score as a rank-2 program and a rank-4 program started from the same values (three programs:
    in float64, tests/tiny.py TOL64)."""
    tc = TrainConfig(rounds=1, local_steps=3, batch_size=4, seq_len=8, prune_lambda=0.05)
    cfg = functools.partial(_cfg, dtype="float64")
    base = tiny_base(cfg(4))
    train, valid = markov_users(2, 300, 0), markov_users(2, 150, 100)
    het = Simulation(cfg(4), tc, get_method("local"), base, train, valid, seed=1, ranks=[2, 4])
    sims = {2: Simulation(cfg(2), tc, get_method("local"), base, train, valid, seed=1),
            4: Simulation(cfg(4), tc, get_method("local"), base, train, valid, seed=1)}
    for sim in sims.values():  # the same starting values (the padded init truncated to the rank)
        sim.states = jax.tree.map(lambda h, t: jnp.array(np.asarray(h)[tuple(slice(0, d) for d in t.shape)]),
                                  het.states, sim.states)
    flat0 = traverse_util.flatten_dict(het.states.params)
    assert not np.any(np.asarray(flat0[("h_0", "mlp", "specialists", "fc_A")])[0, ..., 2:])  # masked at init
    m_het = het.run_round()
    ce_het = het.evaluate(valid, 8, 4)["ce"]
    for u, r in ((0, 2), (1, 4)):
        sim = sims[r]
        m = sim.run_round()
        for k in ("loss", "ce", "prune"):
            np.testing.assert_allclose(m_het[k][u], m[k][u], **TOL64, err_msg=k)
        got, want = traverse_util.flatten_dict(het.states.params), traverse_util.flatten_dict(sim.states.params)
        for k, x in want.items():
            g = np.asarray(got[k])[u]
            np.testing.assert_allclose(g[tuple(slice(0, d) for d in x.shape[1:])], np.asarray(x)[u], **TOL64,
                                       err_msg=str(k))
            if g.shape != x.shape[1:]:  # the masked tail stayed 0 through Adam's updates
                assert not np.any(g[..., r:] if k[-1].endswith("_A") else g[..., r:, :]), k
        np.testing.assert_allclose(ce_het[u], sim.evaluate(valid, 8, 4)["ce"][u], **TOL64)


def test_bad_ranks_fail_in_one_line_before_compile():
    tc = TrainConfig(rounds=1, local_steps=1, batch_size=2, seq_len=8)
    train = markov_users(2, 100, 0)
    for ranks, words in (([2, 8], "does not fit the padded rank 4"), ([2], "1 entries for 2 users")):
        with pytest.raises(ValueError, match=words) as e:
            Simulation(_cfg(4), tc, get_method("hetlora"), tiny_base(_cfg(4)), train, train, ranks=ranks)
        assert "\n" not in str(e.value)


def test_config_ranks_wrong_length_or_too_large_fail_in_one_line():
    from comigs_jax import configuration
    from comigs_jax.errors import ConfigError
    from configs import base

    c = base.get_config("hetlora")
    c.model.rank, c.data.n_users = 32, 4
    c.model.ranks = "16,32,32,32"
    configuration.validate(c)
    assert configuration.ranks_of(c) == [16, 32, 32, 32]
    for ranks, words in (("16,32", "4 entries"), ("16,64,32,32", "padded rank"), ("16,x,32,32", "integers")):
        c.model.ranks = ranks
        with pytest.raises(ConfigError, match=words) as e:
            configuration.validate(c)
        assert "\n" not in str(e.value) and "model.ranks" in str(e.value)
