"""Server optimizers (comigs_jax.federated.server_optimizer, servers/optimizer.py) against a NumPy
transcription of Reddi et al. (ICLR 2021) Algorithm 2 and FedAvgM; the mean they replace; their
state through a checkpoint; FedProx's proximal term against NumPy; the one-line refusals."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.federated.methods import get_method
from comigs_jax.federated.server import Rows, Setup, Uploads
from comigs_jax.federated.server_optimizer import ServerOptimizer
from comigs_jax.federated.servers import SERVERS, server_for
from tiny import TOL64, as_if_killed_after_round, markov_users, tiny_base, tiny_cfg

# two federations of 4 users and one padding row (the last federation's, weight 0)
GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
LRS = (0.3, 0.05)  # each federation's server.lr
ATTN = ("h_0", "attn", "c_attn", "lora_A")
SPEC = ("h_0", "mlp", "specialists", "fc_A")  # two slots, the first shared (heterogeneous expert counts)
ROUTER = ("h_0", "mlp", "router", "kernel")


def _rows(rng, x):
    """Every row's leaves after local training: the server value x [2, ...] of its federation plus
    noise; the router is local."""
    flat = {p: x[p][GROUPS] + 0.1 * rng.standard_normal((len(GROUPS),) + x[p].shape[1:]) for p in x}
    flat[ROUTER] = rng.standard_normal((len(GROUPS), 4, 2))
    return flat


def _numpy_algorithm2(opt, x, m, v, rows, w):
    """One round of Algorithm 2 (adam / yogi / adagrad) or FedAvgM (sgd) per federation, float64.
    x, m, v: {path: [2, ...]}; rows: every row's leaves; w [rows]: upload weights."""
    for g in (0, 1):
        sel = GROUPS == g
        if w[sel].sum() == 0:
            continue  # nobody uploaded: no step
        for p in x:
            delta = np.tensordot(w[sel] / w[sel].sum(), rows[p][sel], axes=1) - x[p][g]  # the paper's Delta_t
            if p == SPEC:
                delta[1] = 0  # the second specialist slot is local: no pseudo-gradient there
            if opt.name == "sgd":  # m = beta m - Delta, x = x - eta m (optax.sgd's trace)
                m[p][g] = opt.momentum * m[p][g] - delta
                x[p][g] = x[p][g] - LRS[g] * m[p][g]
                continue
            m[p][g] = opt.b1 * m[p][g] + (1 - opt.b1) * delta
            d2 = delta ** 2
            v[p][g] = {"adam": opt.b2 * v[p][g] + (1 - opt.b2) * d2,
                       "yogi": v[p][g] - (1 - opt.b2) * d2 * np.sign(v[p][g] - d2),
                       "adagrad": v[p][g] + d2}[opt.name]
            x[p][g] = x[p][g] + LRS[g] * m[p][g] / (np.sqrt(v[p][g]) + opt.tau)


def _server(opt, method="fedavg"):
    server = server_for(get_method(method), ranked=False, optimizer=opt)
    setup = Setup(get_method(method), n_shared_specialists=1, n_groups=2)
    rows = Rows(len(GROUPS), GROUPS, tuple({"seed": s, "server.lr": lr} for s, lr in enumerate(LRS)))
    return server, setup, rows


@pytest.mark.parametrize("opt", [ServerOptimizer("sgd", momentum=0.9), ServerOptimizer("adam"),
                                 ServerOptimizer("yogi", b2=0.9, tau=1e-2), ServerOptimizer("adagrad", b1=0.5)])
def test_server_optimizers_are_algorithm_2_over_three_rounds_per_federation(opt, x64):
    rng = np.random.default_rng(0)
    x = {ATTN: rng.standard_normal((2, 5, 3)), SPEC: rng.standard_normal((2, 2, 5, 2))}  # one value per federation
    m = {p: np.zeros_like(a) for p, a in x.items()}
    v = {p: np.full_like(a, opt.tau ** 2) for p, a in x.items()}  # v_{-1} = tau^2
    server, setup, rows = _server(opt)
    start = {p: a[GROUPS] for p, a in x.items()} | {ROUTER: np.zeros((len(GROUPS), 4, 2))}
    state = jax.tree.map(jnp.asarray, server.init(setup, rows))
    state = jax.jit(lambda p, s: server.start(setup, p, s))(traverse_util.unflatten_dict(start), state)
    apply = jax.jit(lambda p, u, s: server.apply(setup, p, u, s))
    weights = [np.array([1, 2, 0, 1, 1, 1, 3, 1, 0.0]), np.array([0, 1, 1, 1, 2, 0, 0, 1, 0.0]),
               np.array([1, 1, 1, 1, 0, 0, 0, 0, 0.0])]  # round 3: federation 1 silent
    for w in weights:
        local = _rows(rng, x)
        up = Uploads(jnp.asarray(w), jnp.asarray(w), jnp.asarray(GROUPS, jnp.int32))
        out, state = apply(traverse_util.unflatten_dict(local), up, state)
        out = traverse_util.flatten_dict(out)
        _numpy_algorithm2(opt, x, m, v, local, w)
        np.testing.assert_allclose(out[ATTN], x[ATTN][GROUPS], **TOL64)
        np.testing.assert_allclose(out[SPEC][:, 0], x[SPEC][GROUPS][:, 0], **TOL64)
        np.testing.assert_array_equal(out[SPEC][:, 1], local[SPEC][:, 1])  # the local slot: the row's own
        np.testing.assert_array_equal(out[ROUTER], local[ROUTER])  # FedAvg shares no router
    value = traverse_util.flatten_dict(state["server_value"])
    np.testing.assert_allclose(value[ATTN], x[ATTN][GROUPS], **TOL64)  # the state holds the server value


def test_none_is_the_mean_record_and_sgd_at_lr_1_is_the_mean_to_float32_rounding():
    """server.optimizer=none chooses the mean's own record (the same compiled program: today's
    mean bit for bit). sgd with lr 1 and no momentum computes x - (x - a), a the mean (the same
    float32 a: the stage calls the mean); two roundings of relative size <= u = 2^-24 give
    |(x - (x - a)) - a| <= u |x - a| + u |a| (to first order; the factor 1.0001 covers the rest)."""
    from comigs_jax import rules
    from configs import tiny
    c = tiny.get_config("fedavg")
    assert c.server.optimizer == "none" and rules.server_optimizer_of(c) is None
    assert server_for(get_method("fedavg"), False, None) is SERVERS["mean"]
    server, setup, _ = _server(ServerOptimizer("sgd"))
    rows = Rows(len(GROUPS), GROUPS, ({"seed": 0, "server.lr": 1.0}, {"seed": 1, "server.lr": 1.0}))
    rng = np.random.default_rng(1)
    x = {ATTN: rng.standard_normal((2, 5, 3)).astype(np.float32), SPEC: rng.standard_normal((2, 2, 5, 2)).astype(np.float32)}
    state = server.start(setup, traverse_util.unflatten_dict({p: a[GROUPS] for p, a in x.items()}),
                         jax.tree.map(jnp.asarray, server.init(setup, rows)))
    local = {p: a.astype(np.float32) for p, a in _rows(rng, x).items()}
    w = np.array([1, 2, 0, 1, 1, 1, 3, 1, 0], np.float32)
    up = Uploads(jnp.asarray(w), jnp.asarray(w), jnp.asarray(GROUPS, jnp.int32))
    params = traverse_util.unflatten_dict(local)
    got, state = jax.jit(lambda p, s: server.apply(setup, p, up, s))(params, state)
    got, value = traverse_util.flatten_dict(got), traverse_util.flatten_dict(state["server_value"])
    np.testing.assert_array_equal(value[ATTN], got[ATTN])  # the stage ran: its server value is the rows' new value
    mean = traverse_util.flatten_dict(jax.jit(lambda p: SERVERS["mean"].apply(setup, p, up, {}))(params)[0])
    for p in (ATTN, SPEC):
        a, xt = np.asarray(mean[p], np.float64), x[p][GROUPS].astype(np.float64)
        bound = 1.0001 * 2.0 ** -24 * (np.abs(xt - a) + np.abs(a))
        assert np.all(np.abs(np.asarray(got[p], np.float64) - a) <= bound), p


def test_on_the_rank_masked_mean_each_row_steps_its_own_components(x64):
    """With per-user ranks (model.ranks) the aggregate is the rank-masked mean: each row's server
    value and step cover its own rank components (Algorithm 2's FedAdam per row on the masked
    mean's output, NumPy), and the components beyond a row's rank stay 0."""
    from comigs_jax.federated.server import rank_state
    from comigs_jax.model.config import LoRAConfig
    lora, ranks = LoRAConfig(rank=2, alpha=16.0), np.array([2, 1, 2, 2, 2, 2, 1, 2, 2])
    opt = ServerOptimizer("adam", b1=0.5)
    server = server_for(get_method("fedavg"), ranked=True, optimizer=opt)
    assert server.name == "masked_mean+adam" and server.ranked
    setup = Setup(get_method("fedavg"), n_shared_specialists=1, n_groups=2, lora=lora)
    rows = Rows(len(GROUPS), GROUPS, tuple({"seed": s, "server.lr": lr} for s, lr in enumerate(LRS)), ranks)
    on = (np.arange(2) < ranks[:, None]).astype(np.float64)[:, None, None, :]  # [rows, 1, 1, r]: the row's components
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 5, 2))[GROUPS] * on
    state = {"ranks": rank_state(ranks, lora)} | server.init(setup, rows)
    state = server.start(setup, {"h_0": {"mlp": {"specialists": {"fc_A": jnp.asarray(x)}}}},
                         jax.tree.map(jnp.asarray, state))
    m, v = np.zeros_like(x), np.full_like(x, opt.tau ** 2)
    for w in (np.array([1, 2, 1, 1, 1, 1, 3, 1, 0.0]), np.array([0, 1, 1, 1, 2, 0, 1, 1, 0.0])):
        local = {"h_0": {"mlp": {"specialists": {"fc_A": jnp.asarray((x + 0.1 * rng.standard_normal(x.shape)) * on)}}}}
        up = Uploads(jnp.asarray(w), jnp.asarray(w), jnp.asarray(GROUPS, jnp.int32))
        agg = np.asarray(SERVERS["masked_mean"].apply(setup, local, up, {"ranks": state["ranks"]})[0]["h_0"]["mlp"]
                         ["specialists"]["fc_A"])
        out, state = server.apply(setup, local, up, state)
        g = x - agg  # each row's pseudo-gradient on its own components
        m = opt.b1 * m + (1 - opt.b1) * g
        v = opt.b2 * v + (1 - opt.b2) * g ** 2
        x = x - np.array(LRS)[GROUPS][:, None, None, None] * m / (np.sqrt(v) + opt.tau)
        got = np.asarray(out["h_0"]["mlp"]["specialists"]["fc_A"])
        np.testing.assert_allclose(got, x, **TOL64)
        assert np.all(got * (1 - on) == 0)  # beyond each row's rank: 0


FEDS = [{"seed": 1, "server.lr": 0.1, "prox_mu": 0.0}, {"seed": 2, "server.lr": 0.5, "prox_mu": 0.1}]


def _sim(method, rounds, opt, feds=FEDS, dtype="float32", **kw):
    from comigs_jax.experiment.simulation import Simulation
    from comigs_jax.train.state import TrainConfig
    cfg, tc = tiny_cfg(dtype=dtype), TrainConfig(rounds=rounds, local_steps=2, batch_size=2, seq_len=8)
    return Simulation(cfg, tc, get_method(method), tiny_base(cfg), markov_users(3, 200, 0), markov_users(3, 100, 100),
                      federations=feds, dropout=0.3, server_optimizer=opt, **kw)


def test_federations_with_their_own_server_lr_and_prox_mu_equal_their_runs_alone(x64):
    """An lr / mu sweep as one program: each federation's rows after two rounds of FedYogi equal
    the run of that federation alone (float64: the two programs agree to TOL64)."""
    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.sharding import single_device_mesh
    opt = ServerOptimizer("yogi")
    both = _sim("pfedmoe", 2, opt, dtype="float64")
    alone = [_sim("pfedmoe", 2, opt, feds=[f], dtype="float64") for f in FEDS]
    for sim in (both, *alone):
        for _ in range(2):
            sim.run_round()
            sim.aggregate()
    layout = Layout(3, single_device_mesh())
    for f, one in enumerate(alone):
        got = both.federation_states(f, layout)
        for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(one._saved())[0], jax.tree.leaves(got)):
            if jnp.issubdtype(x.dtype, jnp.floating):
                np.testing.assert_allclose(np.asarray(y), np.asarray(x), **TOL64, err_msg=jax.tree_util.keystr(p))


def test_server_state_resumes_bit_for_bit_through_a_checkpoint(tmp_path):
    """Three rounds of CoMiGS with FedAdam (two federations with their own server.lr and prox_mu,
    drop-outs) = two rounds, each federation's checkpoint written and read back as its own run
    does (experiment.program), then the third round in a new Simulation."""
    from tiny import assert_trees_equal, resume_one_more_round_each_federation_alone
    opt = ServerOptimizer("adam")
    whole = _sim("comigs", 3, opt)
    for _ in range(3):
        whole.run_round()
        whole.aggregate()
    first = _sim("comigs", 3, opt)
    for _ in range(2):
        first.run_round()
        first.aggregate()
    again = _sim("comigs", 3, opt)
    assert set(again.server.saved) == {"server_value", "server_opt"}
    resume_one_more_round_each_federation_alone(first, again, 3, 2, tmp_path)
    for a, b in ((whole.states, again.states), (whole.server_state, again.server_state)):
        assert_trees_equal(a, b)


# ----------------------------------------------------------------------------- FedProx
def test_proximal_term_adds_mu_times_the_distance_to_the_round_start_on_shared_leaves_only(x64):
    """grad(loss + mu/2 ||w - w0||^2 over the shared leaves) - grad(loss) = mu (w - w0) there and
    0 on the local leaves (NumPy); mu = 0 adds nothing to the program."""
    from comigs_jax.train.state import TrainConfig, init_trainable
    from comigs_jax.train.steps import _grads, proximal_term, prox_weight, with_prox_anchor
    cfg, method, mu = tiny_cfg(dtype="float64"), get_method("comigs"), 0.3
    base = tiny_base(cfg)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), init_trainable(cfg, jax.random.PRNGKey(0)))
    w0 = jax.tree.map(lambda a, k: a + 0.1 * jax.random.normal(jax.random.PRNGKey(k), a.shape, a.dtype), params,
                      jax.tree.unflatten(jax.tree.structure(params), range(len(jax.tree.leaves(params)))))
    tc = TrainConfig(prox_mu=mu)
    data = with_prox_anchor({}, w0, tc, method)
    windows = jnp.asarray(markov_users(1, 2 * 9, 0)[0]).reshape(2, 9)
    mask = jnp.ones(cfg.moe.n_experts, bool)
    keep = lambda p: True
    grads = jax.jit(lambda p, prox: _grads(keep, p, base, windows, mask, cfg, 0.01, None, data, prox=prox),
                    static_argnums=1)  # one compile each, not op by op
    (_, g0), (m, g1) = grads(params, None), grads(params, mu)
    flat_p, flat_0 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(w0)
    g0, g1 = traverse_util.flatten_dict(g0), traverse_util.flatten_dict(g1)
    shared = [p for p in flat_p if method.is_shared(p)]
    assert shared and len(shared) < len(flat_p)  # CoMiGS: attention and generalists shared, the rest local
    for p in flat_p:
        want = mu * (np.asarray(flat_p[p]) - np.asarray(flat_0[p])) if p in shared else 0.0
        np.testing.assert_allclose(np.asarray(g1[p]) - np.asarray(g0[p]), want, rtol=1e-9, atol=1e-12, err_msg=str(p))
    want = 0.5 * sum(np.sum((np.asarray(flat_p[p]) - np.asarray(flat_0[p])) ** 2) for p in shared)
    np.testing.assert_allclose(float(m["prox"]), want, rtol=1e-12)
    np.testing.assert_allclose(float(proximal_term(params, data["prox_anchor"])), want, rtol=1e-12)
    off, d = TrainConfig(), {"train": 0}
    assert prox_weight(off, None) is None and with_prox_anchor(d, params, off, method) is d  # mu = 0: no term traced


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method, key, value, match", [
    ("fedavg", "server.lr", 0.0, r"^config.server.lr=0.0 is not allowed: a positive finite number$"),
    ("fedavg", "server.lr", -1.0, r"^config.server.lr=-1.0 is not allowed: a positive finite number$"),
    ("fedavg", "server.optimizer", "adamw", r"^config.server.optimizer='adamw' is not allowed: none \| sgd \| adam \| "
                                            r"yogi \| adagrad$"),
    ("fedavg", "server.momentum", 1.0, r"^config.server.momentum=1.0 is not allowed: in \[0, 1\)$"),
    ("fedavg", "server.tau", 0.0, r"^config.server.tau=0.0 is not allowed: a positive finite number"),
    ("fedavg", "train.prox_mu", -0.1, r"^config.train.prox_mu=-0.1 is not allowed: a non-negative finite number$"),
    ("fedprox", "train.prox_mu", 0.0, r"^config.train.prox_mu=0.0 is not allowed: > 0 for method fedprox"),
    ("local", "train.prox_mu", 0.1, r"^config.train.prox_mu=0.1 is not allowed: 0 for method local \(it shares nothing"),
    ("local", "server.optimizer", "adam", r"^config.server.optimizer='adam' is not allowed: none for method local "
                                          r"\(it shares nothing after round 0\)$"),
    ("pcl", "server.optimizer", "sgd", r"^config.server.optimizer='sgd' is not allowed: none for method pcl \(PCL"),
])
def test_bad_server_and_prox_settings_are_one_line_before_any_compile(method, key, value, match):
    from comigs_jax import configuration
    from comigs_jax.errors import ConfigError
    from configs import tiny
    c = tiny.get_config(method)
    group, name = key.split(".")
    c[group][name] = value
    with pytest.raises(ConfigError, match=match) as e:
        configuration.validate(c)
    assert "\n" not in str(e.value)


def test_fedprox_and_server_optimizers_validate_where_they_apply():
    from comigs_jax import configuration
    from configs import tiny
    c = tiny.get_config("fedprox")
    c.train.prox_mu, c.server.optimizer, c.server.lr = 0.01, "adam", 0.1
    configuration.validate(c)
    fed = configuration.federation_config(c, [configuration.federation_of(c, 0)])
    assert fed.server_optimizer == ServerOptimizer("adam") and fed.federations[0]["server.lr"] == 0.1
    assert fed.federations[0]["prox_mu"] == 0.01
    assert "server.lr" in configuration.FEDERATION_KEYS and "train.prox_mu" in configuration.FEDERATION_KEYS
    with pytest.raises(ValueError, match=r"server.lr=0 is not allowed"):
        dataclasses.replace(fed, federations=({"seed": 0, "server.lr": 0},))


def test_a_fedprox_run_with_fedadam_and_stacked_seeds_resumes_bit_for_bit(tiny_cache, tmp_path):
    """experiments.run of method=fedprox (mu 0.01) with FedAdam, two seeds as one program: each
    seed's checkpoint holds its server value and optax state; killed after round 2, the same
    command resumes and ends with the uninterrupted run's results, bit for bit."""
    import json
    import os

    from entrypoint import main as run
    wd = str(tmp_path / "wd")
    args = ["--config=configs/tiny.py:fedprox", f"--workdir={wd}", "--config.train.prox_mu=0.01",
            "--config.server.optimizer=adam", "--config.server.lr=0.1", "--config.seeds=0,7",
            "--config.federation.stack_seeds=True"]
    p = run(args, tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    load = lambda d: json.load(open(os.path.join(wd, d, "results.json")))
    clean = lambda r: {k: v for k, v in r.items() if k not in ("speed", "provenance")}
    first = {d: clean(load(d)) for d in ("fedprox_s0", "fedprox_s7")}
    for d in first:
        as_if_killed_after_round(os.path.join(wd, d))
    p = run(args, tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from round 2" in p.stdout
    for d, res in first.items():
        assert clean(load(d)) == res, d
    saved = json.load(open(os.path.join(wd, "fedprox_s7", "config.json")))["config"]
    assert saved["server"]["optimizer"] == "adam" and saved["train"]["prox_mu"] == 0.01
