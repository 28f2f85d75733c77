"""Every server of the registry (comigs_jax.federated.servers) through the one interface,
`apply(setup, params, inputs, state) -> (params, state)`, against NumPy: two federations on one
row axis (each averages within itself), a padding row, shared and local leaves; the rank state
(ranks, rank scale) it returns; the choice of server per method."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.federated.methods import METHODS, get_method
from comigs_jax.federated.ranks import lora_scale, mask_ranks, prune_rank, rank_scales
from comigs_jax.federated.server import Rows, Setup, Uploads, rank_state, round_data
from comigs_jax.federated.servers import SERVERS, server_for
from comigs_jax.model.config import LoRAConfig

from tiny import TOL64

R, D_IN, D_OUT = 4, 5, 6
LORA = LoRAConfig(rank=R, alpha=16.0)
GROUPS = np.array([0, 0, 0, 1, 1, 1, 1])  # two federations of 3 users, one padding row (weight 0)
RANKS = [4, 4, 3, 2, 4, 4, 4]
ATTN = ("h_0", "attn", "c_attn", "lora_A")
SPEC = ("h_0", "mlp", "specialists")


def _params(seed=0, ranks=RANKS, tiny_tail=()):
    """Rows' trainable leaves: an attention LoRA factor (shared by every method here), one
    specialist's fc / proj LoRA at the padded rank (zero beyond each row's rank), a router kernel."""
    rng = np.random.default_rng(seed)
    flat = {ATTN: rng.standard_normal((len(ranks), D_IN, 3)).astype(np.float32),
            ("h_0", "mlp", "router", "kernel"): rng.standard_normal((len(ranks), D_IN, 2)).astype(np.float32)}
    for name, (i, o) in (("fc", (D_IN, D_OUT)), ("proj", (D_OUT, D_IN))):
        a, b = rng.standard_normal((len(ranks), 1, i, R)), rng.standard_normal((len(ranks), 1, R, o))
        for u, r in enumerate(ranks):
            a[u, ..., r:], b[u, ..., r:, :] = 0, 0
            if u in tiny_tail:
                a[u, ..., prune_rank(r):r] *= 1e-3
        flat[SPEC + (f"{name}_A",)], flat[SPEC + (f"{name}_B",)] = a.astype(np.float32), b.astype(np.float32)
    return flat


def _apply(server_name, method, flat, w, n_tok=None, ranks=RANKS):
    server = SERVERS[server_name]
    setup = Setup(method, n_shared_specialists=1, n_groups=2, lora=LORA)
    state = {"ranks": rank_state(ranks, LORA)} if server.ranked else {}
    state.update(server.init(setup, Rows(len(ranks), GROUPS, ({"seed": 0}, {"seed": 1}), np.asarray(ranks))))
    state = jax.tree.map(jnp.asarray, state)
    up = Uploads(jnp.asarray(w, jnp.float32), jnp.asarray(w if n_tok is None else n_tok, jnp.float32),
                 jnp.asarray(GROUPS, jnp.int32))
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    out, state = jax.jit(lambda p, u, s: server.apply(setup, p, u, s))(params, up, state)
    return {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(out).items()}, state


def _np_group_mean(x, w):
    """Each row's federation's weighted mean (rows of a federation without weight keep theirs)."""
    out = x.astype(np.float64).copy()
    for g in np.unique(GROUPS):
        sel = GROUPS == g
        if w[sel].sum() > 0:
            out[sel] = np.tensordot(w[sel] / w[sel].sum(), x[sel].astype(np.float64), axes=1)
    return out


def test_mean_server_is_the_weighted_mean_within_each_federation():
    fedavg = get_method("fedavg")  # attn, generalist, specialist shared; no router
    flat = _params()
    for w in (np.array([1, 0, 2, 1, 1, 3, 0.0]), np.array([0, 0, 0, 1, 2, 0, 0.0])):  # federation 0 silent
        out, state = _apply("mean", fedavg, flat, w)
        assert state == {}
        for k, x in flat.items():
            want = x if k[-2] == "router" else _np_group_mean(x, w)
            np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_masked_mean_server_weighs_each_rank_component_by_the_rows_that_have_it():
    method = get_method("fedavg")
    flat, w = _params(1), np.array([1, 2, 0, 1, 1, 1, 0.0])
    out, state = _apply("masked_mean", method, flat, w)
    np.testing.assert_array_equal(np.asarray(state["ranks"]["current"]), RANKS)
    m = (np.arange(R) < np.array(RANKS)[:, None]).astype(np.float64)           # [rows, R]
    for k, x in flat.items():
        if k[:3] != SPEC:  # the attention LoRA by the mean; the router is not shared (FedAvg has none)
            want = x if k[-2] == "router" else _np_group_mean(x, w)
            np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6, err_msg=str(k))
            continue
        shape = [len(RANKS), 1, 1, 1]
        shape[-1 if k[-1].endswith("_A") else -2] = R
        for g in (0, 1):
            sel = GROUPS == g
            wm = (w[sel][:, None] * m[sel]).reshape([sel.sum()] + shape[1:])
            mean = (wm * x[sel]).sum(0) / np.where(wm.sum(0) > 0, wm.sum(0), 1)
            np.testing.assert_allclose(out[k][sel], mean[None] * m[sel].reshape(wm.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["hetlora", "hetlora_reference"])
def test_hetlora_servers_work_within_each_federation_and_their_state_holds_the_ranks(name, x64):
    """Both HetLoRA servers (checked against NumPy oracles of the paper and of the reference code
    in tests/test_hetlora.py) over three rounds of two federations on one row axis: every
    federation's rows, ranks and server tails are those of the server run on that federation
    alone; round 0 cuts nobody; a federation none of whose users uploaded keeps everything;
    the padding row (weight 0) is never cut; the rank scale follows the ranks. Float64 (x64):
    the two programs sum the same rows in other orders."""
    reference = name == "hetlora_reference"
    method = get_method("hetlora").for_mode(reference)
    server = SERVERS[name]
    assert server is SERVERS[method.server]

    def init(groups, feds, ranks, flat):
        shapes = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in flat.items()})
        setup = Setup(method, n_shared_specialists=1, n_groups=len(feds), lora=LORA)
        state = {"ranks": rank_state(ranks, LORA)}
        state.update(server.init(setup, Rows(len(ranks), groups, feds, np.asarray(ranks), shapes)))
        return setup, jax.tree.map(jnp.asarray, state)

    def apply(setup, flat, w, groups, state):
        up = Uploads(jnp.asarray(w), jnp.asarray(w), jnp.asarray(groups, jnp.int32))
        params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
        out, state = jax.jit(lambda p, u, s: server.apply(setup, p, u, s))(params, up, state)
        return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(out).items()}, state

    flat = {k: v.astype(np.float64) for k, v in _params(2).items()}
    both = init(GROUPS, ({"seed": 0}, {"seed": 1}), RANKS, flat)
    alone = [init(np.zeros(int((GROUPS == g).sum()), np.int32), ({"seed": g},), [RANKS[i] for i in np.flatnonzero(
        GROUPS == g)], flat) for g in (0, 1)]
    states = [both[1], alone[0][1], alone[1][1]]
    weights = [np.array([1, 1, 1, 1, 1, 1, 0.0]), np.array([0, 0, 0, 1, 1, 1, 0.0]), np.array([1, 1, 1, 1, 1, 1, 0.0])]
    for rnd, w in enumerate(weights):
        flat = {k: v if k[-2] == "router" else v * (1 + (k[:3] == SPEC) * 0.5 * np.random.default_rng(rnd).random(
            v.shape[:1] + (1,) * (v.ndim - 1))) for k, v in _params(10 + rnd, tiny_tail=(0, 1, 2, 3, 4)).items()}
        flat = traverse_util.flatten_dict(mask_ranks(  # the rows' current ranks: zero beyond
            traverse_util.unflatten_dict(flat), states[0]["ranks"]["scale"], states[0].get("module_ranks")))
        flat = {k: np.asarray(v, np.float64) for k, v in flat.items()}
        out, states[0] = apply(both[0], flat, w, GROUPS, states[0])
        for g in (0, 1):
            sel = np.flatnonzero(GROUPS == g)
            got, states[1 + g] = apply(alone[g][0], {k: v[sel] for k, v in flat.items()}, w[sel],
                                       np.zeros(len(sel)), states[1 + g])
            for k in got:
                if k[-2] != "router":  # hetlora shares every role but the router
                    np.testing.assert_allclose(out[k][sel], got[k], **TOL64, err_msg=f"{rnd} {g} {k}")
            for key in ("server_tail",) + (("module_ranks",) if reference else ()):
                np.testing.assert_allclose(np.asarray(states[0][key])[sel], np.asarray(states[1 + g][key]), **TOL64)
            np.testing.assert_array_equal(np.asarray(states[0]["ranks"]["current"])[sel],
                                          np.asarray(states[1 + g]["ranks"]["current"]))
        new = np.asarray(states[0]["ranks"]["current"])
        if rnd == 0:
            assert new.tolist() == RANKS  # the server's B is 0 before the first aggregation
        if rnd == 1:  # federation 0 silent: its rows keep their leaves
            for k in flat:
                np.testing.assert_array_equal(out[k][:3], flat[k][:3])
    assert new[6] == RANKS[6] and (new < RANKS).any()
    np.testing.assert_array_equal(np.asarray(states[0]["ranks"]["scale"]), rank_scales(new, RANKS, LORA, R))
    data = round_data(states[0])
    assert ("rank_modules" in data) == reference
    if reference:
        np.testing.assert_array_equal(data["rank_modules"], states[0]["module_ranks"])


@pytest.mark.parametrize("name", ["flexlora", "flexlora_reference"])
def test_flexlora_servers_match_the_svd_of_each_federations_mean(name):
    reference = name == "flexlora_reference"
    method = get_method("flexlora").for_mode(reference)
    assert method.server == name
    flat, w, n = _params(3), np.ones(7), np.array([300, 100, 200, 50, 150, 100, 0.0])
    out, state = _apply(name, method, flat, w, n_tok=n)
    full = np.array(RANKS, np.float64)
    s = np.array([lora_scale(LORA, int(r)) for r in RANKS])
    form, back = (16.0 / full, np.full(7, 16.0 / R)) if reference else (s, s)
    np.testing.assert_allclose(np.asarray(state["form"]), form, rtol=1e-6)
    for nm in ("fc", "proj"):
        ka, kb = SPEC + (f"{nm}_A",), SPEC + (f"{nm}_B",)
        dw = np.einsum("u...ir,u...ro->u...io", flat[ka].astype(np.float64), flat[kb]) * form[:, None, None, None]
        for g in (0, 1):
            sel = np.flatnonzero(GROUPS == g)
            last = sel[n[sel] > 0][-1]
            mean = n[last] * dw[last] / n[sel].sum() if reference else \
                (n[sel, None, None, None] * dw[sel]).sum(0) / n[sel].sum()
            uu, ss, vt = np.linalg.svd(mean[0], full_matrices=False)
            for i in sel:
                r = RANKS[i]
                np.testing.assert_allclose(out[ka][i][0] @ out[kb][i][0], (uu[:, :r] * ss[:r]) @ vt[:r] / back[i],
                                           rtol=1e-4, atol=1e-5, err_msg=f"{nm} row {i}")
    np.testing.assert_allclose(out[ATTN], _np_group_mean(flat[ATTN], w), rtol=1e-5, atol=1e-6)


def test_pcl_server_mixes_every_leaf_and_no_server_changes_nothing():
    flat = _params(4)
    rng = np.random.default_rng(0)
    wmix = np.eye(7)
    for g in (0, 1):  # softmax-like rows within each federation; the padding row keeps itself
        sel = np.flatnonzero(GROUPS[:6] == g)
        e = rng.random((len(sel), len(sel)))
        wmix[np.ix_(sel, sel)] = e / e.sum(1, keepdims=True)
    server, setup = SERVERS["pcl"], Setup(get_method("pcl"), 0, 2)
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    out, state = server.apply(setup, params, jnp.asarray(wmix, jnp.float32), {})
    for k, x in traverse_util.flatten_dict(out).items():
        np.testing.assert_allclose(np.asarray(x), np.einsum("ij,j...->i...", wmix, flat[k]), rtol=1e-5, atol=1e-6)
    assert [server.after_round(get_method("pcl"), r) for r in range(8)] == [False] * 4 + [True, False, True, False]
    out, state = SERVERS["none"].apply(Setup(get_method("local"), 0, 2), params, None, {})
    assert out is params and state == {} and not SERVERS["none"].after_round(get_method("local"), 3)


def test_each_method_names_one_server_chosen_in_one_place():
    for name, m in METHODS.items():
        for method in {m, m.for_mode(True)}:
            s = server_for(method, ranked=False)
            assert s is SERVERS[method.server], name
            assert s.name == ("pcl" if method.pcl else "none" if method.one_round else method.server), name
    assert server_for(get_method("fedavg"), ranked=True) is SERVERS["masked_mean"]
    assert server_for(get_method("hetlora"), ranked=True) is SERVERS["hetlora"]
    with pytest.raises(ValueError, match="one-round methods have server 'none'"):
        dataclasses.replace(get_method("fedavg"), one_round=True)
    with pytest.raises(ValueError, match="server='fedadam'"):
        dataclasses.replace(get_method("fedavg"), server="fedadam")


def _count_apply(setup, params, up, state):
    """A toy server with state per federation: the mean, and each row's count of its federation's
    uploads so far (what a server optimizer's state is to issue 30: arrays [rows, ...])."""
    import jax.ops
    from comigs_jax.federated.servers.mean import mean_of_shared
    n = jax.ops.segment_sum((up.weights > 0).astype(jnp.int32), up.groups, setup.n_groups)
    return mean_of_shared(setup, params, up), {**state, "count": state["count"] + jnp.take(n, up.groups)}


def test_a_new_server_is_one_module_and_one_registry_line_and_its_state_resumes(monkeypatch):
    """docs/architecture.md's walk-through: a Server record (here defined in the test instead of a
    module of federated/servers/), one line in SERVERS, a method naming it. In a stacked
    Simulation its state is per federation, and the keys it lists in `saved` go with each run's
    checkpoint (federation_states) and come back in a run alone (set_federation_states)."""
    from comigs_jax.experiment.simulation import Simulation
    from comigs_jax.federated import servers
    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.server import Server
    from comigs_jax.federated.sharding import single_device_mesh
    from comigs_jax.train.state import TrainConfig
    from tiny import markov_users, tiny_base, tiny_cfg

    count = Server("count", _count_apply, init=lambda setup, rows: {"count": np.zeros(rows.n_rows, np.int32)},
                   saved=("count",))
    monkeypatch.setitem(servers.SERVERS, "count", count)  # the registry line
    method = dataclasses.replace(get_method("fedavg"), name="fedavg_count", server="count")
    cfg, tc = tiny_cfg(), TrainConfig(rounds=3, local_steps=2, batch_size=2, seq_len=8)
    train, valid = markov_users(3, 200, 0), markov_users(3, 100, 100)
    sim = Simulation(cfg, tc, method, tiny_base(cfg), train, valid, federations=[{"seed": 1}, {"seed": 2}],
                     dropout=0.5)
    assert sim.server is count
    want = np.zeros(2, int)
    for _ in range(3):
        sim.run_round()
        want += np.asarray(sim.active[:6]).reshape(2, 3).sum(1)
        sim.aggregate()
    got = np.asarray(sim.server_state["count"])
    np.testing.assert_array_equal(got[:6], np.repeat(want, 3))
    assert want[0] != want[1]  # the federations' drop-outs differ: so do their states
    alone = Layout(3, single_device_mesh())
    for f in range(2):
        one = Simulation(cfg, tc, method, tiny_base(cfg), train, valid, seed=f + 1, layout=alone)
        one.set_federation_states([sim.federation_states(f, alone)], alone)
        np.testing.assert_array_equal(np.asarray(one.server_state["count"]), [want[f]] * 3)
