"""Server optimizers on the rank-heterogeneous servers (issue 30 item 1; servers/optimizer.py with
`Server.stepped`): HetLoRA and FlexLoRA with FedAdam and FedAvgM against NumPy transcriptions
written from the rule (not from our code), float64:

- HetLoRA: one global LoRA at the padded rank per federation; each user's cut compares its tail
  with the global it received; pseudo-gradient = global - the |A B|-share zero-padded mean of the
  cut uploads; the optax step; every user receives the new global truncated to its rank.
- FlexLoRA: the server holds dW per module per federation (product space); pseudo-gradient = dW
  - the token-weighted mean of the products s(r_i) A_i B_i; every user receives the rank-r_i SVD
  truncation of the new dW.

Two federations of 4 users (ranks 1-4) with their own server.lr; a user that sits out; a round
where one federation is silent (no step; its users receive the server's value). Also: sgd at lr
1 is each of the four rules to float64 rounding; the state resumes bit for bit through a
checkpoint in a Simulation; PCL and one-round methods are refused in one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.federated.methods import get_method
from comigs_jax.federated.server import Rows, Setup, Uploads, rank_state
from comigs_jax.federated.server_optimizer import ServerOptimizer
from comigs_jax.federated.servers import SERVERS, server_for
from comigs_jax.model.config import LoRAConfig
from tiny import TOL64

R, D_IN, D_OUT, D_ATTN = 4, 5, 6, 3
LORA = LoRAConfig(rank=R, alpha=16.0)  # rslora: s(r) = 16 / sqrt(r)
GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
RANKS = np.array([1, 2, 3, 4, 2, 4, 1, 3])
LRS = (0.3, 0.05)  # each federation's server.lr
PAIRS = [(("h_0", "mlp", "generalists", f"{m}_A"), ("h_0", "mlp", "generalists", f"{m}_B"), d)
         for m, d in (("fc", (D_IN, D_OUT)), ("proj", (D_OUT, D_IN)))]
ATTN = [("h_0", "attn", "c_attn", "lora_A"), ("h_0", "attn", "c_attn", "lora_B")]
WEIGHTS = [np.array([1, 2, 0, 1, 1, 1, 3, 1.0]),  # user 2 sits out
           np.array([2, 1, 1, 1, 0, 0, 0, 0.0]),  # federation 1 silent: no step
           np.array([1, 1, 2, 1, 2, 1, 1, 1.0])]
TAILS = [[1.0] * 8, [0.05, 0.05, 3.0, 0.05, 3.0, 0.05, 1.0, 3.0], [1.0, 0.05, 0.05, 3.0, 1.0, 0.05, 1.0, 0.05]]
OPTS = [ServerOptimizer("adam", b1=0.5, tau=1e-2), ServerOptimizer("sgd", momentum=0.9)]


def _mask(ranks, kind):
    """[U, 1, 1, R] (A) or [U, 1, R, 1] (B): the components below each row's rank."""
    m = (np.arange(R)[None] < np.asarray(ranks)[:, None]).astype(np.float64)
    return m[:, None, None, :] if kind == "A" else m[:, None, :, None]


def _s(r):
    return LORA.alpha / np.sqrt(r)


class NumpyServerOpt:
    """FedAvgM (sgd: m = beta m + g, x -= lr m) or FedAdam (m = b1 m + (1 - b1) g, v = b2 v +
    (1 - b2) g^2, x -= lr m / (sqrt(v) + tau), v_{-1} = tau^2) on a dict of arrays of one federation."""

    def __init__(self, opt, x, lr):
        self.opt, self.lr = opt, lr
        self.m = {k: np.zeros_like(v) for k, v in x.items()}
        self.v = {k: np.full_like(v, opt.tau ** 2) for k, v in x.items()}

    def step(self, x, target):
        o, out = self.opt, {}
        for k in x:
            g = x[k] - target[k]
            if o.name == "sgd":
                self.m[k] = o.momentum * self.m[k] + g
                out[k] = x[k] - self.lr * self.m[k]
                continue
            self.m[k] = o.b1 * self.m[k] + (1 - o.b1) * g
            self.v[k] = o.b2 * self.v[k] + (1 - o.b2) * g ** 2
            out[k] = x[k] - self.lr * self.m[k] / (np.sqrt(self.v[k]) + o.tau)
        return out


def _server(name, opt, feds=None):
    method = get_method("hetlora" if name.startswith("hetlora") else "flexlora")
    method = method.for_mode(name.endswith("_reference"))
    assert method.server == name
    server = server_for(method, ranked=True, optimizer=opt)
    setup = Setup(method, n_shared_specialists=0, n_groups=2, lora=LORA)
    feds = feds or tuple({"seed": s, "server.lr": lr} for s, lr in enumerate(LRS))
    return server, setup, feds


def _start(server, setup, feds, params):
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    state = {"ranks": rank_state(RANKS, LORA)} | server.init(setup, Rows(len(GROUPS), GROUPS, feds, RANKS, shapes))
    state = jax.tree.map(jnp.asarray, state)
    return server.start(setup, params, state) if server.start is not None else state


def _init(rng):
    """Round 0 per federation: expert A random at the padded rank, B = 0 (each row its truncation);
    attention LoRA random (synchronised)."""
    glob = {}
    for a, b, (i, o) in PAIRS:
        glob[a], glob[b] = rng.standard_normal((2, 1, i, R)), np.zeros((2, 1, R, o))
    glob[ATTN[0]], glob[ATTN[1]] = rng.standard_normal((2, D_ATTN, 2)), rng.standard_normal((2, 2, D_ATTN))
    return glob


def _view(glob, ranks):
    """Every row's view of its federation's global: the expert factors truncated to its rank."""
    out = {k: v[GROUPS] for k, v in glob.items()}
    for a, b, _ in PAIRS:
        out[a], out[b] = out[a] * _mask(ranks, "A"), out[b] * _mask(ranks, "B")
    return out


def _train(rng, flat, ranks, tail):
    """A local round: noise on the components each row keeps; each expert module's tail [q, r)
    then scaled by tail[u] (small: likely cut; large: kept)."""
    out = {k: np.asarray(v) + 0.3 * rng.standard_normal(v.shape) for k, v in flat.items()}
    for a, b, _ in PAIRS:
        out[a], out[b] = out[a] * _mask(ranks, "A"), out[b] * _mask(ranks, "B")
        for u, r in enumerate(ranks):
            q = (99 * r) // 100
            out[a][u, ..., q:r] *= tail[u]
            out[b][u, ..., q:r, :] *= tail[u]
    return out


def _fro(x):
    return np.sqrt((x ** 2).sum())


def _tail(a, b, lo, hi):
    return _fro(a[..., lo:hi]) * _fro(b[..., lo:hi, :])


def np_hetlora_round(glob, ranks, up, w):
    """HetLoRA (Cho et al. 2024; clean) with one global per federation, before the server step:
    (new ranks, the aggregate per federation {leaf: [2, ...]}; None for a silent federation)."""
    new, agg = ranks.copy(), {}
    for u, r in enumerate(ranks):  # cuts: the user's summed tails below the received global's
        q, g = (99 * r) // 100, GROUPS[u]
        own = sum(_tail(up[a][u], up[b][u], q, r) for a, b, _ in PAIRS)
        srv = sum(_tail(glob[a][g], glob[b][g], q, r) for a, b, _ in PAIRS)
        if w[u] > 0 and own < srv and q >= 1:
            new[u] = q
    for g in (0, 1):
        sel = (GROUPS == g) & (w > 0)
        if not sel.any():
            agg[g] = None
            continue
        agg[g] = {k: np.tensordot(w[sel] / w[sel].sum(), up[k][sel], axes=1) for k in ATTN}
        for a, b, _ in PAIRS:
            xa, xb = up[a] * _mask(new, "A"), up[b] * _mask(new, "B")
            s = w * np.array([_fro(xa[u, 0] @ xb[u, 0]) for u in range(len(w))])
            agg[g][a] = np.tensordot(s[sel] / s[sel].sum(), xa[sel], axes=1)
            agg[g][b] = np.tensordot(s[sel] / s[sel].sum(), xb[sel], axes=1)
    return new, agg


def _apply(server, setup, flat, w, state):
    up = Uploads(jnp.asarray(w), jnp.asarray(w), jnp.asarray(GROUPS, jnp.int32))
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    out, state = jax.jit(lambda p, u, s: server.apply(setup, p, u, s))(params, up, state)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(out).items()}, state


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.name)
def test_hetlora_with_a_server_optimizer_steps_one_global_per_federation(opt, x64):
    rng = np.random.default_rng(0)
    glob, ranks = _init(rng), RANKS.copy()
    server, setup, feds = _server("hetlora", opt)
    state = _start(server, setup, feds, traverse_util.unflatten_dict(_view(glob, ranks)))
    fed_opt = [NumpyServerOpt(opt, {k: v[g] for k, v in glob.items()}, LRS[g]) for g in (0, 1)]
    flat, cuts = _view(glob, ranks), 0
    for rnd, (w, tail) in enumerate(zip(WEIGHTS, TAILS)):
        up = _train(rng, flat, ranks, tail)
        ours, state = _apply(server, setup, up, w, state)
        new, agg = np_hetlora_round(glob, ranks, up, w)
        for g in (0, 1):
            if agg[g] is not None:
                stepped = fed_opt[g].step({k: v[g] for k, v in glob.items()}, agg[g])
                glob = {k: np.concatenate([v[:g], stepped[k][None], v[g + 1:]]) for k, v in glob.items()}
        cuts += int((new < ranks).sum())
        ranks = new
        np.testing.assert_array_equal(np.asarray(state["ranks"]["current"]), ranks, err_msg=f"round {rnd}")
        want = _view(glob, ranks)
        for k in want:
            np.testing.assert_allclose(ours[k], want[k], **TOL64, err_msg=f"round {rnd} {k}")
        flat = ours
    assert cuts >= 2  # the comparisons read the stepped global


def _products(flat, scale):
    """{A path: [U, 1, in, out]} every row's product scale_u A_u B_u."""
    return {a: np.einsum("uxir,uxro->uxio", flat[a], flat[b]) * np.asarray(scale)[:, None, None, None]
            for a, b, _ in PAIRS}


def _truncated_svd(dw, r):
    """The best rank-r approximation of dw [in, out] (NumPy's SVD)."""
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.name)
def test_flexlora_with_a_server_optimizer_steps_the_product_per_federation(opt, x64):
    """FlexLoRA (clean: c_i = c'_i = s(r_i)): each row's received product s(r_i) A_i B_i is the
    rank-r_i truncation of its federation's stepped dW; dW starts at 0 (B = 0)."""
    rng = np.random.default_rng(1)
    glob = _init(rng)
    server, setup, feds = _server("flexlora", opt)
    flat = _view(glob, RANKS)
    state = _start(server, setup, feds, traverse_util.unflatten_dict(flat))
    dw = {a: np.zeros((2, 1, i, o)) for a, _, (i, o) in PAIRS} | {k: glob[k] for k in ATTN}
    fed_opt = [NumpyServerOpt(opt, {k: v[g] for k, v in dw.items()}, LRS[g]) for g in (0, 1)]
    scale = _s(RANKS)
    for rnd, w in enumerate(WEIGHTS):
        up = _train(rng, flat, RANKS, [1.0] * 8)
        ours, state = _apply(server, setup, up, w, state)
        prod = _products(up, scale)
        for g in (0, 1):
            sel = (GROUPS == g) & (w > 0)
            if not sel.any():
                continue  # silent: no step
            mean = {a: np.tensordot(w[sel] / w[sel].sum(), prod[a][sel], axes=1) for a in prod}
            mean |= {k: np.tensordot(w[sel] / w[sel].sum(), up[k][sel], axes=1) for k in ATTN}
            stepped = fed_opt[g].step({k: v[g] for k, v in dw.items()}, mean)
            dw = {k: np.concatenate([v[:g], stepped[k][None], v[g + 1:]]) for k, v in dw.items()}
        got = _products(ours, scale)
        for a, b, _ in PAIRS:
            want = np.stack([_truncated_svd(dw[a][GROUPS[u], 0], r) for u, r in enumerate(RANKS)])[:, None]
            np.testing.assert_allclose(got[a], want, **TOL64, err_msg=f"round {rnd} {a}")
            np.testing.assert_array_equal(ours[a] * (1 - _mask(RANKS, "A")), 0)  # nothing past the rank
            kept = traverse_util.flatten_dict(state["server_value"])[a[:-1] + (a[-1][:-2] + "_dW",)]
            np.testing.assert_allclose(np.asarray(kept), dw[a][GROUPS], **TOL64)  # the state: dW per row
        for k in ATTN:
            np.testing.assert_allclose(ours[k], dw[k][GROUPS], **TOL64, err_msg=f"round {rnd} {k}")
        flat = ours


@pytest.mark.parametrize("name", ["hetlora", "hetlora_reference", "flexlora", "flexlora_reference"])
def test_sgd_at_lr_1_without_momentum_is_the_rule_itself(name, x64):
    """x - (x - agg) = agg to float64 rounding: the same rows, ranks and HetLoRA tails as the rule
    without a server optimizer over three rounds (every federation uploading: a silent one's rows
    get the server's value, the mean's stage convention, where the rule keeps their leaves).
    FlexLoRA is compared in product space (its SVD's signs are a gauge)."""
    rng = np.random.default_rng(2)
    feds = ({"seed": 0, "server.lr": 1.0}, {"seed": 1, "server.lr": 1.0})
    server, setup, _ = _server(name, ServerOptimizer("sgd"), feds)
    plain = SERVERS[name]
    assert server.name == f"{name}+sgd" and set(server.saved) == set(plain.saved) | {"server_value", "server_opt"}
    flat = _view(_init(rng), RANKS)
    params = traverse_util.unflatten_dict(flat)
    s_plain, s_opt = _start(plain, setup, feds, params), _start(server, setup, feds, params)
    weights = [WEIGHTS[0], WEIGHTS[2], np.array([1, 0, 1, 1, 0, 2, 1, 1.0])]
    tails = [TAILS[0], TAILS[1], [0.05] * 8]
    for rnd, (w, tail) in enumerate(zip(weights, tails)):
        up = _train(rng, flat, np.asarray(s_plain["ranks"]["current"]), tail)
        want, s_plain = _apply(plain, setup, up, w, s_plain)
        got, s_opt = _apply(server, setup, up, w, s_opt)
        for k in plain.saved + ("ranks",):
            for x, y in zip(jax.tree.leaves(s_opt[k]), jax.tree.leaves(s_plain[k])):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL64, err_msg=f"round {rnd} {k}")
        flat = want
        if name.startswith("flexlora"):
            got, want = got | _products(got, np.ones(8)), want | _products(want, np.ones(8))
        for k in [p for a, b, _ in PAIRS for p in ((a,) if name.startswith("flexlora") else (a, b))] + ATTN:
            np.testing.assert_allclose(got[k], want[k], **TOL64, err_msg=f"round {rnd} {k}")
    if name.startswith("hetlora"):
        assert (np.asarray(s_plain["ranks"]["current"]) < RANKS).any()  # cuts happened, and agree


FEDS = [{"seed": 1, "server.lr": 0.1}, {"seed": 2, "server.lr": 0.5}]


def _sim(method, faithful, opt):
    from comigs_jax.experiment.simulation import Simulation
    from comigs_jax.train.state import TrainConfig
    from tiny import markov_users, tiny_base, tiny_cfg
    cfg = tiny_cfg()
    tc = TrainConfig(rounds=3, local_steps=2, batch_size=2, seq_len=8, faithful=faithful)
    return Simulation(cfg, tc, get_method(method), tiny_base(cfg), markov_users(3, 200, 0), markov_users(3, 100, 100),
                      federations=FEDS, dropout=0.3, ranks=[1, 2, 2], server_optimizer=opt)


@pytest.mark.parametrize("method, faithful", [("flexlora", False), ("hetlora", True)])
def test_server_state_resumes_bit_for_bit_through_a_checkpoint(method, faithful, tmp_path):
    """Three rounds with FedAdam (two federations with their own server.lr, drop-outs, ranks
    1, 2, 2) = two rounds, each federation's checkpoint written and read back as its own run
    does (experiment.program), then the third round in a new Simulation; FlexLoRA's server
    value is in product space ([rows, ..., in, out] per module)."""
    from tiny import assert_trees_equal, resume_one_more_round_each_federation_alone
    opt = ServerOptimizer("adam")
    whole, first = _sim(method, faithful, opt), _sim(method, faithful, opt)
    assert whole.server.name == ("flexlora+adam" if method == "flexlora" else "hetlora_reference+adam")
    for sim, n in ((whole, 3), (first, 2)):
        for _ in range(n):
            sim.run_round()
            sim.aggregate()
    value = traverse_util.flatten_dict(whole.server_state["server_value"])
    if method == "flexlora":  # dW [rows, L?, slots, in, out] beside each A [rows, ..., in, r]
        a = [p for p in value if p[-1].endswith("_dW")]
        assert a and all(value[p].shape[-2:] == (16, 64) or value[p].shape[-2:] == (64, 16) for p in a)
    again = _sim(method, faithful, opt)
    resume_one_more_round_each_federation_alone(first, again, 3, 2, tmp_path)
    for a, b in ((whole.states, again.states), (whole.server_state, again.server_state)):
        assert_trees_equal(a, b)


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "pcl", "comigs_2s", "local"])
def test_which_methods_take_a_server_optimizer(method):
    """HetLoRA and FlexLoRA validate with server.optimizer (clean and faithful); PCL and the
    one-round methods are refused in one line before any compile, and their servers by the stage."""
    from comigs_jax import configuration
    from comigs_jax.errors import ConfigError
    from configs import tiny
    c = tiny.get_config(method)
    c.server.optimizer, c.server.lr = "adam", 0.1
    m = get_method(method)
    if method in ("hetlora", "flexlora"):
        for faithful in (False, True):
            c.train.faithful = faithful
            configuration.validate(c)
        return
    why = "PCL mixes whole models, with no server" if m.pcl is not None else "it shares nothing after round 0"
    with pytest.raises(ConfigError) as e:
        configuration.validate(c)
    assert str(e.value) == f"config.server.optimizer='adam' is not allowed: none for method {method} ({why})"
    with pytest.raises(ValueError, match=f"^server.optimizer='adam': not on server '{m.server}'"):
        server_for(m, ranked=False, optimizer=ServerOptimizer("adam"))
