"""The bench's sweep: U doubles until the next U would not fit (the capacity model's prediction
and the extrapolated measurement against the memory limit)."""
from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

from comigs_jax.capacity.planning import device_bytes, plan
from comigs_jax.capacity.timing import _print, _rss_bytes, bench_workload
from comigs_jax.capacity.workload import _ints, _users_of, build_workload, mode_layout, workload_configs
from comigs_jax.errors import ConfigError


def memory_limit(fraction: float) -> tuple[float, str]:
    """(bytes, description) the sweep may fill: `fraction` of the host's RAM on CPU (the fake
    devices share it), of one device's memory on accelerators."""
    if jax.default_backend() == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return fraction * total, f"{100 * fraction:.0f}% of {total / 2**30:.1f} GiB RAM"
    stats = jax.local_devices()[0].memory_stats() or {}
    total = stats.get("bytes_limit")
    if not total:
        raise ConfigError("config.sweep=True is not allowed here: the device reports no memory limit")
    return fraction * total, f"{100 * fraction:.0f}% of the device's {total / 2**30:.1f} GiB"


def predicted_bytes(name: str, mc: ConfigDict, cfg: ConfigDict, dtype: str, n_users: int, modes: list[str],
                    baseline: float = 0.0) -> float:
    """What a U would need, from the capacity model (comigs_jax.capacity.device_bytes, the
    backend's activation profile): on CPU the whole process (`baseline` + every device's bytes
    of the largest mode + the workload's initial states, kept beside a mode's copy); on an
    accelerator one device's bytes."""
    model_cfg, tc, method = workload_configs(name, mc, cfg.method, dtype, cfg.remat)
    cpu = jax.default_backend() == "cpu"
    p = plan(model_cfg, tc, method, n_users, train_tokens=mc.train_tokens, valid_tokens=mc.valid_tokens,
                      token_bytes=2 if model_cfg.vocab_size <= 2**16 else 4, targets=["h100"],
                      profile="cpu" if cpu else "accelerator", user_chunk=cfg.user_chunk)
    pu, shared = p["per_user"], p["shared"]["total"]
    need = []
    for mode in modes:
        layout = mode_layout(mode, n_users, cfg.user_chunk)
        if layout is None:  # a loop: every user's state and tokens, one user's step
            need.append(n_users * (pu["state"] + pu["tokens"]) + pu["step"] + shared)
            continue
        d = device_bytes(pu, shared, n_users, layout.n_devices, cfg.user_chunk)
        need.append(d["bytes"]["total"] * (layout.n_devices if cpu else 1))
    copies = n_users * pu["state"] if (cpu and len(modes) > 1) else 0
    return baseline + max(need) + copies


def _extrapolate(points: list[tuple[int, float]], n_users: int, baseline: float = 0.0) -> float:
    """Measured bytes at n_users from the last measured points: the line through the last two,
    or, from one, `baseline` (what was resident before any U) plus the rest in proportion to U."""
    if not points:
        return 0.0
    (u1, b1) = points[-1]
    if len(points) == 1:
        return baseline + max(b1 - baseline, 0.0) * n_users / u1
    (u0, b0) = points[-2]
    return b1 + (n_users - u1) * max(b1 - b0, 0.0) / (u1 - u0)


def sweep_model(name: str, mc: ConfigDict, cfg: ConfigDict, modes: list[str], dtype: str,
                peaks: list[float]) -> tuple[list[dict], dict]:
    """Doubles U from the model's first listed U until the next U would not fit (the larger of the
    capacity model's prediction and the extrapolated measurement exceeds memory_limit), a U runs
    out of memory, or U passes cfg.sweep_max_users. Returns (rows, summary): the largest U that
    completed a round, with its round time (fastest mode), and why the sweep stopped."""
    limit, what = memory_limit(cfg.sweep_fraction)
    cpu = jax.default_backend() == "cpu"
    baseline = _rss_bytes() if cpu else 0.0
    u = _ints(_users_of(cfg, name))[0]
    rows, points, best, base, stop = [], [], None, None, ""
    while True:
        if cfg.sweep_max_users and u > cfg.sweep_max_users:
            stop = f"U={u} > sweep_max_users={cfg.sweep_max_users}"
            break
        model = predicted_bytes(name, mc, cfg, dtype, u, modes, baseline)
        pred = max(model, _extrapolate(points, u, baseline))
        if pred > limit:
            stop = f"U={u} would need {pred / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB ({what})"
            break
        _print(f"{name} sweep: U={u}, predicted {pred / 2**30:.2f} GiB of {limit / 2**30:.1f} GiB")
        w = build_workload(name, mc, u, cfg.method, dtype, cfg.seed, base, cfg.remat, cfg.user_chunk)
        base = w.base
        rs = bench_workload(w, modes, cfg, peaks)
        del w
        for r in rs:
            r.update(predicted_bytes=pred, model_bytes=model)
        rows += rs
        ok = [r for r in rs if "round_s" in r]
        if not ok:
            stop = f"U={u} did not complete a round: " + "; ".join(f"{r['mode']} {r['skipped']}" for r in rs)
            break
        fastest = min(ok, key=lambda r: r["round_s"])
        best = {"users": u, "mode": fastest["mode"], "round_s": fastest["round_s"], "chunk": fastest.get("chunk"),
                "tokens_per_s": fastest["tokens_per_s"]}
        measured = max(r["peak_rss_gib"] if cpu else (r["device_peak_gib"] or 0.0) for r in ok) * 2**30
        points.append((u, measured))
        u *= 2
    summary = {"model": name, "largest": best, "stopped": stop, "limit_bytes": limit, "limit": what,
               "measured_bytes": points}
    _print(f"{name} sweep: largest U that completed a round: "
           + (f"{best['users']} ({best['mode']}, {best['round_s']:.3g} s per round)" if best else "none")
           + f"; stopped: {stop}")
    return rows, summary
