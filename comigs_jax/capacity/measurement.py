"""The capacity model against the compiled round program: XLA's memory_analysis() of
vmap_round at several U (compile only), beside the model's bytes."""
from __future__ import annotations

from typing import Optional

from comigs_jax.capacity.planning import _b, device_bytes, plan
from comigs_jax.federated.methods import Method, configure_model
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import TrainConfig


def compiled_memory(model_cfg: ModelConfig, tc: TrainConfig, method: Method, n_users: int, *,
                    train_tokens: int, valid_tokens: int, token_dtype: str = "uint16", user_chunk: int = 0,
                    compiler_options: Optional[dict] = None) -> dict:
    """Bytes of the compiled round program `vmap_round(...)` at U = n_users on one device of the
    default backend, from XLA's memory_analysis() (compile only: nothing runs, nothing is
    allocated). The users are laid out as a run lays them out (comigs_jax.federated.layout.Layout
    with `user_chunk`, padding rows included), on a one-device mesh: what one device holds for
    n_users users, running them user_chunk at a time.

    total = arguments + outputs - aliased (the donated states) + temporaries; also `rows` (the
    padded user axis), `chunk` (the layout's effective chunk, 0 = all at once) and `compile_s`."""
    import time

    import jax
    import jax.numpy as jnp

    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.roles import split_base
    from comigs_jax.federated.sharding import single_device_mesh
    from comigs_jax.model.lm import param_shapes
    from comigs_jax.train.rounds import vmap_round
    from comigs_jax.train.state import init_states

    cfg = configure_model(model_cfg, method)
    layout = Layout(n_users, single_device_mesh(), chunk=user_chunk)
    n, users, rep = layout.n_rows, layout.users, layout.replicated
    S = lambda shape, dtype, sharding=users: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    place = lambda tree, sharding: jax.tree.map(lambda x: S(x.shape, x.dtype, sharding), tree)
    base = place(split_base(param_shapes(cfg.base))[0], rep)
    n_shared = cfg.moe.n_specialists
    states = place(jax.eval_shape(lambda k: init_states(cfg, tc, method, k, n, n_shared), jax.random.key(0)), users)
    tok = jnp.dtype(token_dtype)
    data = {"train": S((n, train_tokens), tok), "train_len": S((n,), jnp.int32),
            "valid": S((n, valid_tokens), tok), "valid_len": S((n,), jnp.int32)}
    args = (base, states, data, S((n, cfg.moe.n_experts), jnp.bool_), S((n,), jnp.bool_))
    t = time.perf_counter()
    fn = vmap_round(cfg, tc, method, tc.local_steps, mesh=layout.mesh, user_chunk=layout.model_chunk)
    m = fn.lower(*args).compile(compiler_options=compiler_options).memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                           "alias_size_in_bytes", "temp_size_in_bytes")}
    out["total"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                    + out["temp_size_in_bytes"])
    out.update(rows=n, chunk=layout.model_chunk, compile_s=time.perf_counter() - t)
    return out


def engine_server_bytes(model_cfg: ModelConfig, tc: TrainConfig, method: Method, n_rows: int,
                        server_optimizer=None, dp: bool = False, ranked: bool = False) -> int:
    """Bytes of the server state the engine builds for `n_rows` rows of one federation, as
    Simulation._init_server builds it (server.initial_state, then its start: a server optimizer's
    value and optax state) plus DP's round-start copy of the shared leaves (Simulation.run_round),
    from shapes (jax.eval_shape: nothing runs); host float64 arrays as the device holds them."""
    import functools

    import jax
    import numpy as np

    from comigs_jax.federated.privacy import DP, shared_start
    from comigs_jax.federated.server import Rows, Setup, initial_state
    from comigs_jax.federated.servers import server_for
    from comigs_jax.train.state import init_states

    m = method.for_mode(tc.faithful)
    cfg = configure_model(model_cfg, m)
    srv = server_for(m, ranked, server_optimizer, dp)
    setup = Setup(m, cfg.moe.n_specialists, 1, cfg.moe.lora, DP() if dp else None)
    params = jax.eval_shape(lambda k: init_states(cfg, tc, m, k, n_rows, cfg.moe.n_specialists),
                            jax.random.key(0)).params
    full = np.full(n_rows, cfg.moe.lora.rank, np.int32) if ranked or srv.ranked else None
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    state = initial_state(srv, setup, Rows(n_rows, np.zeros(n_rows, np.int32), ({"seed": 0},), full, one))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jax.dtypes.canonicalize_dtype(np.asarray(a).dtype)),
                         state)
    if srv.start is not None:
        state = jax.eval_shape(lambda p, s: srv.start(setup, p, s), params, state)
    if srv.needs_start:
        state = {**state, "round_start": jax.eval_shape(functools.partial(shared_start, m), params)}
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def measure(model_cfg: ModelConfig, tc: TrainConfig, method: Method, users=(16, 64), profile: Optional[str] = None,
            user_chunk: int = 0, server: Optional[dict] = None, **kw) -> dict:
    """Compiled bytes at each U (the same `user_chunk`), the marginal bytes per row (user, padding
    included) between the smallest and largest U, and the model's bytes beside them: per U the
    device total (comigs_jax.capacity.device_bytes), the arguments (state, tokens and the base)
    and the temporaries (the activations of the users alive at once). `server`: plan()'s server
    keywords; the engine's server state at those rows (`engine_server_bytes`: resident beside the
    round program, not its argument) is then added to each U's measured total and arguments."""
    import jax
    server = server or {}
    profile = profile or ("cpu" if jax.default_backend() == "cpu" else "accelerator")
    runs = {u: compiled_memory(model_cfg, tc, method, u, user_chunk=user_chunk, **kw) for u in users}
    for r in runs.values():
        r["server_state"] = engine_server_bytes(model_cfg, tc, method, r["rows"], **server) if server else 0
        r["total"] += r["server_state"]
    lo, hi = min(users), max(users)
    p = plan(model_cfg, tc, method, hi, train_tokens=kw.get("train_tokens", 0),
             valid_tokens=kw.get("valid_tokens", 0), token_bytes=2 if kw.get("token_dtype", "uint16") == "uint16" else 4,
             profile=profile, user_chunk=user_chunk, **server)
    pu, model_shared = p["per_user"], p["shared"]["total"]
    per_u = {}
    for u, r in runs.items():
        d = device_bytes(pu, model_shared, u, 1, user_chunk)
        b = d["bytes"]
        args = b["state"] + b["tokens"] + model_shared
        per_u[u] = {"rows": d["rows"], "live": d["live"], "measured_total": r["total"], "measured_per_user": r["total"] / u,
                    "model_total": b["total"], "ratio": b["total"] / r["total"],
                    "model_arguments": args, "arguments_ratio": args / (r["argument_size_in_bytes"] + r["server_state"]),
                    "model_activations": b["activations"],
                    "activations_ratio": b["activations"] / max(r["temp_size_in_bytes"], 1)}
    rows_lo, rows_hi = per_u[lo]["rows"], per_u[hi]["rows"]
    marginal = (runs[hi]["total"] - runs[lo]["total"]) / (rows_hi - rows_lo)
    model_marginal = (per_u[hi]["model_total"] - per_u[lo]["model_total"]) / (rows_hi - rows_lo)
    return {"profile": profile, "user_chunk": user_chunk, "remat": model_cfg.remat, "compiled": runs,
            "marginal_per_user": marginal, "model_per_user": model_marginal, "model_shared": model_shared,
            "model_step": pu["step"], "model_state": pu["state"], "model_tokens": pu["tokens"],
            "model_server": p["server"]["total"],
            "ratio_marginal": model_marginal / marginal, "per_u": per_u,
            # total at zero rows: the shared bytes, plus the live users' working set when chunked
            "measured_intercept": runs[lo]["total"] - rows_lo * marginal,
            "model_intercept": per_u[lo]["model_total"] - rows_lo * model_marginal}


def format_measurement(m: dict, users) -> str:
    import jax
    dev = jax.devices()[0]
    chunk = m["user_chunk"]
    lines = [f"\nCompiled round program on {jax.default_backend()} ({dev.device_kind}), user_chunk {chunk}, "
             f"remat {m['remat']!r}: memory_analysis() (compile only)", "",
             "| U | rows | live | arguments (model) | outputs | aliased | temporaries (model) | total | total / U "
             "| model total | model / measured | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in users:
        r, q = m["compiled"][u], m["per_u"][u]
        args = r["argument_size_in_bytes"] + r["server_state"]  # the server's state: beside the program
        lines.append(f"| {u} | {q['rows']} | {q['live']} | {_b(args)} ({_b(q['model_arguments'])}) | "
                     f"{_b(r['output_size_in_bytes'])} | {_b(r['alias_size_in_bytes'])} | "
                     f"{_b(r['temp_size_in_bytes'])} ({_b(q['model_activations'])}) | {_b(r['total'])} | "
                     f"{_b(q['measured_per_user'])} | {_b(q['model_total'])} | {q['ratio']:.3f} | {r['compile_s']:.1f} |")
    lines += ["", f"Model profile {m['profile']!r}: per user state {_b(m['model_state'])}, tokens {_b(m['model_tokens'])}, "
                  f"one step's working set {_b(m['model_step'])}. Marginal bytes per row: measured "
                  f"{_b(m['marginal_per_user'])}, model {_b(m['model_per_user'])} (model / measured "
                  f"{m['ratio_marginal']:.3f}); intercept (shared bytes{' + one chunk' if chunk else ''}): measured "
                  f"{_b(m['measured_intercept'])}, model {_b(m['model_intercept'])}. "
                  f"rows = users padded to whole chunks; live = users whose activations are alive at once."]
    if m["model_server"]:
        hi = max(users)
        lines[-1] += (f" The server's state (not an argument of the round program: held beside it) is added to the "
                      f"measured arguments and totals: at U = {hi} the engine's {_b(m['compiled'][hi]['server_state'])}, the "
                      f"model's {_b(m['model_server'])} per row.")
    return "\n".join(lines) + "\n"
