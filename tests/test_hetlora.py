"""HetLoRA's two servers (issue 29) against NumPy oracles written from their sources, not from our
code:

- `hetlora_reference` (train.faithful) against a transcription of 77efb25's
  `collab_utils/aggregation_strategies.py` HetLoraAggregationStrategy (init, _to_pruned_client_data,
  to_max_dim, to_update, to_client_data), `collab_utils/server.py` Server.aggregate_parameters /
  _update_state and `collab_utils/clients.py` GeneralClient.synchronize, in the reference's torch
  layout (lora_A [r, in], lora_B [out, r]; tensors physically cut): 3 users of ranks 2, 4, 3,
  2 layers (fc and proj each: 4 LoRA modules), 3 rounds; round 0 cuts nobody; modules of one
  user end at different ranks; a rank-1 module goes to 0 (the reference's floor);
- `hetlora` (clean) against the paper's rule (Cho et al. 2024; docs/reproducing.md): one rank per
  user cut on the sum of its tails against the global modules it received, before the
  zero-padded mean weighted by |B A|_F shares; never below rank 1;
- the communication count per LoRA module.
Float64 throughout (x64_module): the two programs agree to rounding, and every cut decision
compares tails that differ by far more than that."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.federated.communication import accounting, shared_params_per_user
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.ranks import prune_rank
from comigs_jax.federated.server import Rows, Setup, Uploads, rank_state, round_data
from comigs_jax.federated.servers import SERVERS
from comigs_jax.model.config import LoRAConfig
from comigs_jax.model.lm import param_shapes
from comigs_jax.federated.roles import role_of
from tiny import tiny_cfg

pytestmark = pytest.mark.usefixtures("x64_module")

R, ATTN_R, D, H = 4, 2, 16, 64  # padded rank, attention LoRA rank, n_embd, MLP width (tiny_cfg's)
RANKS = [2, 4, 3]
LORA = LoRAConfig(rank=R, alpha=16.0)
STRENGTH = 0.99  # the scripts' --pruning_strength
# our leaf -> (the reference's parameter name, (in, out) of the matmul)
MODULES = {(f"h_{l}", "mlp", "generalists", m): (f"transformer.h.{l}.mlp.experts.0.c_{m}", dims)
           for l in range(2) for m, dims in (("fc", (D, H)), ("proj", (H, D)))}
ATTN = {(f"h_{l}", "attn", "c_attn"): (f"transformer.h.{l}.attn.c_attn", (D, 3 * D)) for l in range(2)}


# ------------------------------------------------------------------ the reference, transcribed
class RefHetLora:
    """77efb25's HetLoraAggregationStrategy in NumPy (torch layout; `ranks[c][name]` the shapes)."""

    def __init__(self):
        self.ranks, self.adaptive_weights, self.all_updated_weights, self._weight = None, {}, [], None

    def _to_pruned_client_data(self, name_a, a, name_b, b, server_states, strength):
        k = int(strength * a.shape[0])
        own = np.linalg.norm(a[k:, :]) * np.linalg.norm(b[:, k:])
        srv = (np.linalg.norm(server_states[name_a][k:a.shape[0], :])
               * np.linalg.norm(server_states[name_b][:, k:b.shape[1]]))
        if own < srv:
            return a[:k, :].copy(), b[:, :k].copy()
        return a, b

    def to_max_dim(self, param, c, name):
        if not self.ranks:
            return param
        d0, d1 = self.ranks[c][name]
        return param[:d0, :d1].copy()

    def init(self, updated_models, server_states, strength):
        self._weight = 1 / len(updated_models)
        updated_ranks, self.adaptive_weights, self.all_updated_weights = [], {}, []
        for c, model in enumerate(updated_models):
            ranks, updated = {}, {}
            for name, param in model.items():
                if "lora_A" in name and "mlp" in name:
                    name_b = name.replace("lora_A", "lora_B")
                    a = self.to_max_dim(param, c, name)
                    b = self.to_max_dim(model[name_b], c, name_b)
                    a, b = self._to_pruned_client_data(name, a, name_b, b, server_states, strength)
                    updated[name], updated[name_b] = a.copy(), b.copy()
                    ranks[name], ranks[name_b] = a.shape, b.shape
            updated_ranks.append(ranks)
            self.all_updated_weights.append(updated)
        self.ranks = updated_ranks
        for updated in self.all_updated_weights:
            for name, p in updated.items():
                self.adaptive_weights[name] = self.adaptive_weights.get(name, 0) + np.linalg.norm(p)

    def to_update(self, name, client_data, c):
        if name in self.adaptive_weights:
            p = self.all_updated_weights[c][name]
            return p * np.linalg.norm(p) / self.adaptive_weights[name]
        return self._weight * client_data

    def to_client_data(self, name, c, client_data, server_param):
        if not self.ranks or name not in self.ranks[c]:
            h, w = client_data.shape
            return server_param[:h, :w].copy()
        h, w = self.ranks[c][name]
        return server_param[:h, :w].copy()


def ref_aggregate(server_model, clients, strategy):
    """Server.aggregate_parameters: init with the server's state before the round, then the
    zero-padded sum of every client's to_update; the server model takes it."""
    strategy.init(clients, {k: v.copy() for k, v in server_model.items()}, STRENGTH)
    state = {}
    for c, model in enumerate(clients):
        for name, p in model.items():
            upd = strategy.to_update(name, p, c)
            state.setdefault(name, np.zeros_like(server_model[name]))
            state[name][:upd.shape[0], :upd.shape[1]] += upd
    server_model.update(state)


def ref_synchronize(client, server_model, strategy, c):
    """GeneralClient.synchronize: the client's full-size tensor zeroed, the server's top-left block
    of to_client_data's shape copied in; returns the shapes it must keep (its `pruned`)."""
    for name, p in client.items():
        upd = strategy.to_client_data(name, c, p, server_model[name])
        client[name] = np.zeros_like(p)
        client[name][:upd.shape[0], :upd.shape[1]] = upd


# ------------------------------------------------------------------ the two layouts
def _ref_names():
    """{our leaf path: (the reference's name, kind, (in, out))}: kind A / B an expert LoRA factor
    (ranked), a / b an attention one."""
    out = {}
    for leaf, (name, dims) in MODULES.items():
        out[leaf + (f"{leaf[-1]}_A",)] = (f"{name}.lora_A", "A", dims)
        out[leaf + (f"{leaf[-1]}_B",)] = (f"{name}.lora_B", "B", dims)
    for leaf, (name, dims) in ATTN.items():
        out[leaf + ("lora_A",)], out[leaf + ("lora_B",)] = (f"{name}.lora_A", "a", dims), (f"{name}.lora_B", "b", dims)
    return out


NAMES = _ref_names()


def to_ours(clients) -> dict:
    """Reference clients (torch layout, each at its own rank) -> our stacked leaves at the padded
    rank R: expert A [U, 1, in, R], B [U, 1, R, out]; attention A [U, in, r], B [U, r, out]."""
    out = {}
    for path, (name, kind, _) in NAMES.items():
        rows = []
        for model in clients:
            x = model[name].T
            if kind in "AB":
                pad = [(0, 0), (0, R - x.shape[1])] if kind == "A" else [(0, R - x.shape[0]), (0, 0)]
                x = np.pad(x, pad)[None]
            rows.append(x)
        out[path] = np.stack(rows)
    return out


def _train(clients, shapes, rng, tail):
    """A local round as the reference's: every factor moves within the client's kept shape (its
    `pruned` zeroing after each step); then each module's tail components [q, r) are scaled by
    tail[c][module] (small: likely cut; large: kept)."""
    for c, model in enumerate(clients):
        for name in model:
            h, w = shapes[c].get(name, model[name].shape)
            model[name][:h, :w] += 0.3 * rng.standard_normal((h, w))
        for m, (name, _) in enumerate(MODULES.values()):
            r = shapes[c].get(f"{name}.lora_A", model[f"{name}.lora_A"].shape)[0]
            q = int(STRENGTH * r)
            model[f"{name}.lora_A"][q:r] *= tail[c][m]
            model[f"{name}.lora_B"][:, q:r] *= tail[c][m]


def _our_apply(server, method, flat, state):
    setup = Setup(method, n_shared_specialists=0, n_groups=1, lora=LORA)
    up = Uploads(jnp.ones(len(RANKS)), jnp.ones(len(RANKS)), jnp.zeros(len(RANKS), jnp.int32))
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    out, state = jax.jit(lambda p, u, s: server.apply(setup, p, u, s))(params, up, state)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(out).items()}, state


def _init_state(server, method, flat):
    shapes = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in flat.items()})
    setup = Setup(method, n_shared_specialists=0, n_groups=1, lora=LORA)
    state = {"ranks": rank_state(RANKS, LORA)}
    state.update(server.init(setup, Rows(len(RANKS), np.zeros(len(RANKS), np.int32), ({"seed": 0},),
                                         np.asarray(RANKS), shapes)))
    return jax.tree.map(jnp.asarray, state)


def _clients_and_server(rng):
    """The reference's start: the server model at rank max(ranks) (A random, B = 0) and every
    client synchronised from it at round 0 (to_client_data before any init: its own shape)."""
    def shape(kind, r, i, o):
        return (r, i) if kind in "Aa" else (o, r)
    server = {n: rng.standard_normal(shape(k, R if k in "AB" else ATTN_R, *d)) if k in "Aa"
              else np.zeros(shape(k, R if k in "AB" else ATTN_R, *d)) for n, k, d in NAMES.values()}
    clients = [{n: np.zeros(shape(k, r if k in "AB" else ATTN_R, *d)) for n, k, d in NAMES.values()} for r in RANKS]
    return server, clients


TAILS = [  # per round, user, module (h_0 fc, h_0 proj, h_1 fc, h_1 proj): the tail's scale after training
    [[0.01] * 4] * 3,  # round 0: tiny tails everywhere, and still nobody is cut (the server's B is 0)
    [[0.05, 3.0, 0.05, 3.0], [0.05, 0.05, 3.0, 3.0], [3.0, 0.05, 0.05, 3.0]],
    [[0.05, 0.05, 3.0, 0.05], [3.0, 0.05, 0.05, 3.0], [0.05, 3.0, 0.05, 0.05]],
]


def _module_ranks(strategy):
    """[U, M] the reference's ranks per module, in our module order (sorted A paths)."""
    order = sorted(p for p in NAMES if p[-1].endswith("_A") and p[1] == "mlp")
    return np.array([[strategy.ranks[c][NAMES[p][0]][0] for p in order] for c in range(len(RANKS))])


def test_faithful_server_is_the_reference_transcribed_over_three_rounds():
    rng = np.random.default_rng(0)
    server_model, clients = _clients_and_server(rng)
    strategy = RefHetLora()
    for c, model in enumerate(clients):  # round 0's synchronize
        ref_synchronize(model, server_model, strategy, c)
    method = get_method("hetlora").for_mode(True)
    server = SERVERS[method.server]
    assert server.name == "hetlora_reference"
    state = _init_state(server, method, to_ours(clients))
    history = []
    for rnd, tail in enumerate(TAILS):
        shapes = [{} if strategy.ranks is None else strategy.ranks[c] for c in range(len(RANKS))]
        _train(clients, shapes, rng, tail)
        ours, state = _our_apply(server, method, to_ours(clients), state)
        ref_aggregate(server_model, clients, strategy)
        for c, model in enumerate(clients):
            ref_synchronize(model, server_model, strategy, c)
        want = to_ours(clients)
        for k in want:
            np.testing.assert_allclose(ours[k], want[k], rtol=1e-10, atol=1e-12, err_msg=f"round {rnd} {k}")
        ranks = _module_ranks(strategy)
        np.testing.assert_array_equal(np.asarray(state["module_ranks"]), ranks, err_msg=f"round {rnd}")
        np.testing.assert_array_equal(np.asarray(round_data(state)["rank_modules"]), ranks)
        np.testing.assert_array_equal(np.asarray(state["ranks"]["current"]), ranks.max(1))
        history.append(ranks)
    assert (history[0] == np.array(RANKS)[:, None]).all()  # round 0: nobody cut, tiny tails and all
    final = history[-1]
    assert (final < np.array(RANKS)[:, None]).any() and (final == np.array(RANKS)[:, None]).any()
    assert any(len(set(row)) > 1 for row in final)  # one user's modules at different ranks
    assert final.min() == 0  # user 0's rank-2 module: 2 -> 1 -> 0, the reference's floor
    _check_communication(history, method)


def _check_communication(history, method):
    """shared_params_per_user and accounting per LoRA module against the reference's shapes: a
    user sends its cut A [r_m, in] and B [out, r_m] of each module (nothing of a rank-0 one) and
    the attention LoRA and router whole (the `all` strategy)."""
    cfg = tiny_cfg(n_experts=1, n_generalists=1, top_k=1, n_layer=2)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, lora=LORA))
    flat = traverse_util.flatten_dict(param_shapes(cfg))
    whole = sum(int(np.prod(s.shape)) for p, s in flat.items()
                if method.is_shared(p) and role_of(p) in ("attn", "router"))
    sizes = [i + o for _, (_, (i, o)) in sorted(MODULES.items())]  # the module order of `history` (sorted paths)
    counts = [1] * len(RANKS)
    for ranks in history:
        want = whole + (ranks * np.array(sizes)[None]).sum(1)
        np.testing.assert_array_equal(shared_params_per_user(cfg, method, counts, ranks), want)
    acc = accounting(cfg, method, counts, len(history), [len(history)] * len(RANKS), RANKS, round_ranks=history,
                     round_taken=np.ones((len(history), len(RANKS)), bool))
    before = [np.repeat(np.array(RANKS)[:, None], 4, 1)] + history[:-1]
    up = sum(whole + (r * np.array(sizes)[None]).sum(1) for r in before)
    down = sum(whole + (r * np.array(sizes)[None]).sum(1) for r in history)
    assert acc["upload_params"] == up.tolist() and acc["download_params"] == down.tolist()
    assert acc["final_ranks"] == history[-1].tolist()


# ------------------------------------------------------------------ the paper's rule (clean)
def _fro(x):
    return np.sqrt((np.asarray(x, np.float64) ** 2).sum(axis=(-2, -1)))


def _mask(ranks, kind):
    """[U, 1, 1, R] (A) or [U, 1, R, 1] (B): components below each user's rank."""
    m = (np.arange(R)[None] < np.asarray(ranks)[:, None]).astype(np.float64)
    return m[:, None, None, :] if kind == "A" else m[:, None, :, None]


def np_paper_round(flat, received, ranks):
    """HetLoRA (Cho et al. 2024) in our layout: each user compares the sum over its modules of
    |A[:, q:r]|_F |B[q:r, :]|_F (q = floor(0.99 r)) after local training with the same of the
    global modules it received (`received`: the server's leaves at R before this round), and
    prunes to q when below (never under rank 1); the server zero-pads the pruned modules and
    averages them with weights |B_k A_k|_F / sum_j |B_j A_j|_F per module, and truncates the
    result to each user's rank. Returns (rows' leaves, new ranks, the server's leaves, whether
    some user at rank 1 was below the server's tail)."""
    ranks = np.asarray(ranks)
    q = np.array([int(STRENGTH * r) for r in ranks])
    own, srv = np.zeros(len(ranks)), np.zeros(len(ranks))
    for leaf in MODULES:
        a, b = leaf + (f"{leaf[-1]}_A",), leaf + (f"{leaf[-1]}_B",)
        for u, r in enumerate(ranks):
            own[u] += _fro(flat[a][u][..., q[u]:r]).sum() * _fro(flat[b][u][..., q[u]:r, :]).sum()
            srv[u] += _fro(received[a][..., q[u]:r]).sum() * _fro(received[b][..., q[u]:r, :]).sum()
    below = own < srv
    new = np.where(below & (q >= 1), q, ranks)
    out, server = dict(flat), {}
    for leaf in MODULES:
        a, b = leaf + (f"{leaf[-1]}_A",), leaf + (f"{leaf[-1]}_B",)
        xa, xb = flat[a] * _mask(new, "A"), flat[b] * _mask(new, "B")
        s = np.array([np.linalg.norm(xa[u, 0] @ xb[u, 0]) for u in range(len(ranks))])
        server[a] = np.tensordot(s / s.sum(), xa, axes=1)
        server[b] = np.tensordot(s / s.sum(), xb, axes=1)
        out[a], out[b] = server[a][None] * _mask(new, "A"), server[b][None] * _mask(new, "B")
    for leaf in ATTN:  # attention LoRA: the plain mean
        for f in ("lora_A", "lora_B"):
            out[leaf + (f,)] = np.broadcast_to(flat[leaf + (f,)].mean(0), flat[leaf + (f,)].shape)
    return out, new, server, bool((below & (ranks == 1)).any())


def _train_ours(flat, ranks, rng, tail):
    """Our layout's local round: noise on the components each user keeps, then each module's tail
    [q, r) scaled by tail[u][m]."""
    out = {}
    for k, x in flat.items():
        kind = k[-1][-1] if k[1] == "mlp" else None
        m = _mask(ranks, kind) if kind else 1.0
        out[k] = (x + 0.3 * rng.standard_normal(x.shape)) * m
    for m, leaf in enumerate(MODULES):
        for u, r in enumerate(ranks):
            q = int(STRENGTH * r)
            out[leaf + (f"{leaf[-1]}_A",)][u, ..., q:r] *= tail[u][m]
            out[leaf + (f"{leaf[-1]}_B",)][u, ..., q:r, :] *= tail[u][m]
    return out


def test_clean_server_is_the_papers_rule_and_never_cuts_below_rank_one():
    rng = np.random.default_rng(1)
    server_model, clients = _clients_and_server(rng)
    flat = to_ours(clients)  # round 0: the server's init; B = 0, so nobody is cut
    received = {k: np.zeros_like(v[0]) for k, v in flat.items()}
    method = get_method("hetlora")
    server = SERVERS[method.server]
    assert server.name == "hetlora" and "module_ranks" not in _init_state(server, method, flat)
    state, ranks, floor_held = _init_state(server, method, flat), np.array(RANKS), False
    tails = TAILS + [[[0.05] * 4, [3.0] * 4, [3.0] * 4]] * 2  # user 0 keeps shrinking: 2 -> 1, then held at 1
    for rnd, tail in enumerate(tails):
        flat = _train_ours(flat, ranks, rng, tail)
        ours, state = _our_apply(server, method, flat, state)
        want, new, received, held = np_paper_round(flat, received, ranks)
        floor_held |= held
        np.testing.assert_array_equal(np.asarray(state["ranks"]["current"]), new, err_msg=f"round {rnd}")
        for k in want:
            np.testing.assert_allclose(ours[k], want[k], rtol=1e-10, atol=1e-12, err_msg=f"round {rnd} {k}")
        if rnd == 0:
            np.testing.assert_array_equal(new, RANKS)
        ranks, flat = new, {k: np.array(v) for k, v in ours.items()}
    assert ranks[0] == 1 and floor_held  # below the server's at rank 1, and kept there (the reference: 0)
    assert (ranks < RANKS).any()


def test_faithful_tiny_run_cuts_a_module_to_zero_counts_it_and_resumes_stacked(tiny_cache, tmp_path):
    """The bug of issue 29: prune_rank(1) == 0, after which the communication count raised. The
    reference cuts a rank-1 module to 0 (empty tensors) and keeps it there; so does the faithful
    run (ranks 2, 4, 3, seeds 0 and 1 stacked): the round masks the module, the communication
    counts nothing for it, and a run resumed from its round-3 checkpoints (module ranks and the
    server's tails restored per federation) ends as the uninterrupted one (float64: TOL64)."""
    import json
    import os
    import shutil

    from comigs_jax import experiment
    from comigs_jax.experiment import restore
    from configs import tiny
    from tiny import TOL64, assert_json_close
    assert prune_rank(1) == 0 and [int(STRENGTH * r) for r in range(1, 65)] == [prune_rank(r) for r in range(1, 65)]
    c = tiny.get_config("hetlora")
    c.update_from_flattened_dict({"output.figures": False, "checkpoint.every_rounds": 1, "model.rank": 4,
                                  "model.ranks": "2,4,3", "seeds": "0,1", "federation.stack_seeds": True,
                                  "train.faithful": True, "train.prune_lambda": 0.05,
                                  "data.cache_dir": tiny_cache, "model.dtype": "float64"})
    wd = str(tmp_path / "wd")
    first = experiment.run(c, wd)
    records = [json.loads(x) for x in open(os.path.join(wd, "hetlora_s0", "metrics.jsonl"))]
    modules = np.array([r["expert_module_ranks"] for r in records])              # [rounds, U, M]
    assert modules[-1].min() == 0 and (np.diff(modules, axis=0) <= 0).all()      # cut to 0, never grown
    assert [r["expert_ranks"] for r in records] == modules.max(2).tolist()
    res = first[("hetlora", 0)]
    run = restore.open_run(os.path.join(wd, "hetlora_s0"))
    method = run.method.for_mode(True)
    assert method.server == "hetlora_reference"
    experts = [run.model_cfg.moe.n_experts] * 3
    assert shared_params_per_user(run.model_cfg, method, experts, [2, 4, 3]).tolist() == \
        res["communication"]["per_round_params"]
    counts = [shared_params_per_user(run.model_cfg, method, experts, m) for m in modules]
    assert res["communication"]["download_params"] == sum(counts).tolist()
    assert res["communication"]["final_ranks"] == modules[-1].tolist()
    # the restored users (what export and generate read): each module zero beyond its own rank
    from comigs_jax.federated.ranks import leaf_modules, module_layout
    rows = traverse_util.flatten_dict(restore.restore_rows(run))
    for p, lead, off in module_layout(rows, rows=True):
        ranks = leaf_modules(modules[-1], lead, off)                                # [U, *lead]
        beyond = np.arange(rows[p].shape[-1]) >= ranks[..., None]                    # [U, *lead, r]
        assert not np.any(rows[p][:3] * beyond[:, ..., None, :]), p
    for s in (0, 1):
        d = os.path.join(wd, f"hetlora_s{s}")
        shutil.rmtree(os.path.join(d, "checkpoints", "4"))
        os.remove(os.path.join(d, "results.json"))
    again = experiment.run(c, wd)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("speed", "provenance", "config")}
    for key, res in first.items():
        assert_json_close(strip(again[key]), strip(res), **TOL64)
