"""The plan of U users: per target chip the users per device, the devices needed and the time
per round; how a device holds its users (as federated.layout.Layout lays them out); the plan as
markdown."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from comigs_jax.capacity.flops import round_flops
from comigs_jax.capacity.memory import activation_tensors, head_block_of, shared_bytes, step_bytes, transient_tensors
from comigs_jax.capacity.server_state import server_bytes
from comigs_jax.capacity.sizes import GiB, param_counts, shapes, state_bytes
from comigs_jax.federated.methods import Method, configure_model
from comigs_jax.federated.server_optimizer import ServerOptimizer
from comigs_jax.federated.users import device_chunk, padded_user_count
from comigs_jax.model.family import family_named
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import TrainConfig


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator chip: its memory and its dense bf16 peak (vendor data sheets)."""

    name: str
    memory_bytes: float
    peak_bf16_flops: float
    note: str = ""


# Peaks are the dense (no sparsity) bf16 matmul numbers of the data sheets; GPU memory is what
# nvidia-smi reports for the card (81,559 MiB on an H100 80GB HBM3, 143,771 MiB on an H200).
MiB = 2**20
TARGETS = {
    "h100": Target("NVIDIA H100 SXM 80 GB", 81559 * MiB, 989e12, "81,559 MiB HBM3; 989 TFLOP/s dense bf16"),
    "h200": Target("NVIDIA H200 141 GB", 143771 * MiB, 989e12, "143,771 MiB HBM3e; same tensor cores as H100"),
    "tpu-v4": Target("TPU v4 (per chip)", 32 * GiB, 275e12, "32 GiB HBM2 per chip; 275 TFLOP/s bf16"),
    "tpu-v5e": Target("TPU v5e (per chip)", 16 * GiB, 197e12, "16 GiB HBM2 per chip; 197 TFLOP/s bf16"),
}

# Fraction of a chip's memory the plan lets the round program use: the rest for the runtime,
# XLA's fragmentation and evaluation. (JAX on GPU preallocates 75% by default: set
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 to get this much.)
USABLE_FRACTION = 0.9
# Assumed model FLOP utilisation for the time estimates (experiments.bench measures it).
MFU = 0.35



def device_rows(n_users: int, devices: int = 1, chunk: int = 0) -> dict:
    """How a device holds its users, as comigs_jax.federated.layout.Layout lays them out: `rows`
    (its users padded to whole chunks), the effective `chunk` (0: all at once, also when the chunk
    is at least a device's users) and `live`, the users whose activations are alive at once."""
    c = device_chunk(n_users, devices, chunk)
    rows = padded_user_count(n_users, devices * max(c, 1)) // devices
    return {"users": -(-n_users // devices), "rows": rows, "chunk": c, "live": c or rows}


def device_bytes(per_user: dict, shared: int, n_users: int, devices: int = 1, chunk: int = 0) -> dict:
    """Resident bytes of one device for `n_users` users over `devices` devices with train.user_chunk
    `chunk`: (U / devices) x (state + tokens), padding rows included, + the shared base + the
    activations (one step's working set) of the users alive at once (C, or every user when
    unchunked). `per_user`: plan()'s {"state", "tokens", "step"}."""
    r = device_rows(n_users, devices, chunk)
    out = {"state": r["rows"] * per_user["state"], "tokens": r["rows"] * per_user["tokens"],
           "activations": r["live"] * per_user["step"], "shared": shared}
    out["total"] = sum(out.values())
    return {**r, "bytes": out}


def users_per_device(room: float, per_user: dict, chunk: int = 0) -> int:
    """The most users one device holds in `room` bytes (its memory less the shared bytes): every
    user's state and tokens, and the activations of min(users, chunk) of them at once (every user's
    when chunk is 0)."""
    resident, step = per_user["state"] + per_user["tokens"], per_user["step"]
    at_once = max(int(room // (resident + step)), 0)
    if not chunk or room < chunk * step:
        return at_once
    chunked = int((room - chunk * step) // resident) // chunk * chunk  # whole chunks, no padding
    return max(min(at_once, chunk), chunked)


def plan(model_cfg: ModelConfig, tc: TrainConfig, method: Method, n_users: int, *,
         train_tokens: int = 1_000_000, valid_tokens: int = 100_000, token_bytes: Optional[int] = None,
         targets: Optional[list[str]] = None, mfu: float = MFU, usable_fraction: float = USABLE_FRACTION,
         profile: str = "accelerator", user_chunk: int = 0, server_optimizer: Optional[ServerOptimizer] = None,
         dp: bool = False, ranked: bool = False) -> dict:
    """The capacity plan of `n_users` users of this config: bytes per user (broken down),
    shared bytes, FLOPs per round, and per target chip the users per device, the devices
    needed and an estimated time per round at `mfu`. `user_chunk` (train.user_chunk): a device
    runs its users that many at a time, so it holds every user's state but only a chunk's
    activations; model_cfg.remat says which activations the backward keeps. The server's state
    per row (`server_optimizer`, `dp`, `ranked`: capacity.server_state.server_bytes, by part under
    "server") is part of the state (its "server" entry, when not 0)."""
    cfg = configure_model(model_cfg, method) if model_cfg.moe is not None else model_cfg
    token_bytes = token_bytes or (2 if cfg.vocab_size <= 2**16 else 4)
    st, sp, sh = state_bytes(cfg, tc, method), step_bytes(cfg, tc, method, profile), shared_bytes(cfg)
    sv = server_bytes(cfg, tc, method, server_optimizer, dp, ranked) if cfg.moe is not None else {"total": 0}
    if sv["total"]:  # the rows' server state: resident beside the UserState (0: today's plan, unchanged)
        st = {**{k: v for k, v in st.items() if k != "total"}, "server": sv["total"]}
        st["total"] = sum(st.values())
    tokens = token_bytes * (train_tokens + valid_tokens) + 2 * 4  # + the two lengths
    per_user = {"state": st["total"], "tokens": tokens, "step": sp["total"]}
    per_user["total"] = sum(per_user.values())
    fl = round_flops(cfg, tc, method)
    rows = []
    for key in targets or list(TARGETS):
        t = TARGETS[key]
        room = t.memory_bytes * usable_fraction - sh["total"]
        upd = users_per_device(room, per_user, user_chunk)
        devices = math.ceil(n_users / upd) if upd else None
        if devices:
            per_device = math.ceil(n_users / devices)  # users padded to a multiple of the device count
            sec = per_device * fl["per_user"] / (t.peak_bf16_flops * mfu)
        else:
            per_device, sec = 0, None
        rows.append({"target": key, "name": t.name, "memory_bytes": t.memory_bytes, "peak_flops": t.peak_bf16_flops,
                     "users_per_device": upd, "devices": devices, "users_on_busiest_device": per_device,
                     "round_seconds": sec, "note": t.note})
    return {
        "config": {"n_users": n_users, "family": shapes(cfg).family, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
                   "dtype": cfg.dtype, "batch_size": tc.batch_size, "seq_len": tc.seq_len,
                   "local_steps": tc.local_steps, "router_every": tc.router_every, "router_steps": tc.router_steps,
                   "method": method.name, "n_experts": cfg.moe.n_experts if cfg.moe else 0,
                   "n_generalists": cfg.moe.n_generalists if cfg.moe else 0,
                   "train_tokens": train_tokens, "valid_tokens": valid_tokens, "token_bytes": token_bytes,
                   "mfu": mfu, "usable_fraction": usable_fraction, "profile": profile,
                   "user_chunk": user_chunk, "remat": cfg.remat, "head_block": head_block_of(cfg),
                   "server_optimizer": server_optimizer.name if server_optimizer else "none", "dp": dp,
                   "ranked": ranked},
        "params": param_counts(cfg),
        "state": st, "server": sv, "step": sp, "shared": sh, "per_user": per_user,
        "profile": profile,
        "activations": activation_tensors(cfg, tc.batch_size, tc.seq_len, profile),
        "transient": transient_tensors(cfg, tc.batch_size, tc.seq_len, profile),
        "flops": fl, "flops_round_all_users": n_users * fl["per_user"],
        "targets": rows,
    }


def _b(x: float) -> str:
    for unit, s in ((GiB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= unit:
            return f"{x / unit:,.2f} {s}"
    return f"{x:,.0f} B"


def _group_activations(tensors) -> dict:
    """Kept activations summed by kind over layers (name without the layer prefix)."""
    out = {}
    for name, e, b in tensors:
        key = name.split(".", 1)[1] if name.startswith("L") and "." in name else name
        out[key] = out.get(key, 0) + e * b
    return out


# format_plan's rows of the server's state per row (capacity.server_state.PARTS)
SERVER_LABELS = {"value": "value (the server optimizer's)", "moments": "optimizer state (optax)", "lr": "lr",
                 "round_start": "round-start copy of the shared leaves (DP)", "ranks": "per-row ranks",
                 "rule": "rule state (HetLoRA tails, FlexLoRA scales)"}


def _server_title(c: dict) -> str:
    """The plan title's server settings, "" for neither a server optimizer nor DP."""
    return ((f", server.optimizer {c['server_optimizer']}" if c.get("server_optimizer", "none") != "none" else "")
            + (", DP" if c.get("dp") else ""))


def format_plan(p: dict) -> str:
    c, pc = p["config"], p["params"]
    family = family_named(c["family"]).label
    lines = [f"# Capacity plan: {c['n_users']:,} users, {family} {c['n_layer']}L x {c['n_embd']} (V {c['vocab_size']:,}), "
             f"{c['method']} ({c['n_generalists']}G + {c['n_experts'] - c['n_generalists']}S), "
             f"batch {c['batch_size']} x {c['seq_len']}, {c['dtype']}, remat {c['remat']!r}, "
             f"user_chunk {c['user_chunk']}, activation profile {c['profile']!r}" + _server_title(c), ""]
    lines.append("Trainable parameters per user: " + ", ".join(
        f"{k} {pc[k]:,}" for k in ("attn", "generalist", "specialist", "router", "trainable")) + f"; base {pc['base']:,}")
    lines += ["", "| Per user | Bytes |", "|---|---|"]
    for k, v in p["state"].items():
        if k not in ("total", "server"):
            lines.append(f"| state: {k} | {_b(v)} |")
    for k, v in p["server"].items():  # nothing for a mean without a server optimizer or DP
        if k != "total" and v:
            lines.append(f"| state: server {SERVER_LABELS[k]} | {_b(v)} |")
    lines.append(f"| tokens ({c['train_tokens']:,} + {c['valid_tokens']:,} x {c['token_bytes']} B) | {_b(p['per_user']['tokens'])} |")
    for k, v in p["step"].items():
        if k != "total":
            lines.append(f"| step: {k} | {_b(v)} |")
    lines.append(f"| **total per user** (state + tokens + one step's working set) | **{_b(p['per_user']['total'])}** |")
    lines.append("| shared (replicated per device): " + ", ".join(f"{k} {_b(v)}" for k, v in p["shared"].items()
                                                                     if k != "total") + f" | {_b(p['shared']['total'])} |")
    if c["user_chunk"]:
        pu = p["per_user"]
        lines += ["", f"With train.user_chunk = {c['user_chunk']}, a device holds every user's state and tokens "
                      f"({_b(pu['state'] + pu['tokens'])} per user) but the working set of only {c['user_chunk']} users "
                      f"at once ({_b(c['user_chunk'] * pu['step'])})."]
    lines += ["", "Kept activations of one step, by kind (all layers):", "", "| Tensor | Bytes |", "|---|---|"]
    for k, v in sorted(_group_activations(p["activations"]).items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"| {k} | {_b(v)} |")
    lines += ["", "Largest transient of the backward: " + ", ".join(f"{k} {_b(v)}" for k, v in
                                                                 _group_activations(p["transient"]).items()) + "."]
    fl = p["flops"]
    lines += ["", f"FLOPs per user: expert step {fl['expert_step'] / 1e12:,.3f} TFLOP (forward {fl['forward'] / 1e12:,.3f}), "
                  f"router step {fl['router_step'] / 1e12:,.3f} TFLOP; round = {fl['expert_steps']} expert + "
                  f"{fl['router_steps']:g} router steps = {fl['per_user'] / 1e12:,.2f} TFLOP per user, "
                  f"{p['flops_round_all_users'] / 1e15:,.1f} PFLOP for all users.", "",
              f"| Target | Memory | Peak bf16 | Users / device | Devices for {c['n_users']:,} | "
              f"Round time at {100 * c['mfu']:.0f}% MFU |", "|---|---|---|---|---|---|"]
    for r in p["targets"]:
        sec = "-" if r["round_seconds"] is None else f"{r['round_seconds']:,.1f} s"
        lines.append(f"| {r['name']} | {_b(r['memory_bytes'])} | {r['peak_flops'] / 1e12:,.0f} TFLOP/s | "
                     f"{r['users_per_device']} | {r['devices'] or 'does not fit'} | {sec} |")
    lines.append("")
    chunked = (f"every user's state and tokens plus the working set of {c['user_chunk']} users at once"
               if c["user_chunk"] else "the total per user of every user")
    lines.append(f"Usable memory {100 * c['usable_fraction']:.0f}% of each chip, minus the shared bytes, holds {chunked}; "
                 f"devices = ceil(users / users per device); round time = users on the busiest device x FLOPs per user / "
                 f"(peak x MFU).")
    return "\n".join(lines) + "\n"
