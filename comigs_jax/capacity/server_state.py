"""The server's state per row (comigs_jax.capacity: arithmetic on the config's shapes, nothing
traced): what the engine holds on device beside each user's UserState for the run's server
(comigs_jax.federated.servers.server_for) and server optimizer (servers/optimizer.py), in the
dtypes the engine uses.

Each federation's rows hold copies of one server, so every part is per row (padding rows too):

- value: a server optimizer's server value, the shared leaves (HetLoRA's global truncated to the
  row's rank is held at the padded rank: the same leaves); FlexLoRA's in product space, per shared
  expert LoRA pair dW [slots, d_in, d_out] instead of the factors (the attention LoRA as leaves);
- moments: its optax state: sgd with momentum one copy of the value (optax.trace), sgd without
  none; adam, yogi, adagrad (Algorithm 2, server_optimizer.scale_by_fedopt) two (m, v). No step
  counter: the lr is a per-row scalar, not a schedule (optax.scale_by_learning_rate: empty state);
- lr: the row's server.lr (one float);
- round_start: DP-FedAvg's copy of the shared leaves, made before the round's program (which
  donates the states) and alive on device until the aggregation: resident during the round;
- ranks: the per-row expert LoRA ranks (rank_state: full, current int32; ratio and the rank
  scale [r_max] floats) when the users have ranks (model.ranks) or the rule needs them;
- rule: HetLoRA's server tails [M] (a float per LoRA module M: every expert's fc and proj of every
  layer), and as the reference also every module's rank [M] int32; FlexLoRA's scales form, back.

Floats are the parameters' dtype (float32; float64 for a float64 model, which runs with 64-bit
JAX): the host float64 arrays (lr, ratio, scale, form, back) are float32 on a device without it.
The server program's transients (the aggregation, FlexLoRA's SVDs) run after the round and are not
counted, nor are the per-federation noise keys of DP ([F, 2] uint32)."""
from __future__ import annotations

from typing import Optional

from comigs_jax.capacity.sizes import param_counts, shapes
from comigs_jax.federated.methods import Method
from comigs_jax.federated.server_optimizer import ADAPTIVE, ServerOptimizer
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import TrainConfig

PARTS = ("value", "moments", "lr", "round_start", "ranks", "rule")
# A representative path of each role's leaves (comigs_jax.federated.roles.role_of, factor_of), so
# that whether a role's factor is shared is the method's own rule (Method.is_shared).
_PATH = {"attn": ("h_0", "attn", "c_attn", "lora_{}"), "generalist": ("h_0", "mlp", "generalists", "fc_{}"),
         "specialist": ("h_0", "mlp", "specialists", "fc_{}"), "router": ("h_0", "router", "kernel")}


def shared_elements(cfg: ModelConfig, method: Method) -> dict:
    """Elements per row of the leaves `method` shares, by (role, factor) (factor None: the router):
    what the mean averages, DP copies at a round's start and a server optimizer's value holds."""
    s, p = shapes(cfg), param_counts(cfg)
    L, out = s.n_layer, {}
    slots = {"attn": 1, "generalist": cfg.moe.n_generalists if cfg.moe else 0,
             "specialist": cfg.moe.n_specialists if cfg.moe else 0}
    for role, mats, rank in (("attn", s.attn, cfg.attn_lora.rank if cfg.attn_lora else 0),
                             ("generalist", s.mlp, cfg.moe.lora.rank if cfg.moe else 0),
                             ("specialist", s.mlp, cfg.moe.lora.rank if cfg.moe else 0)):
        for factor, dim in (("A", 1), ("B", 2)):  # A [d_in, r], B [r, d_out]
            path = _PATH[role][:-1] + (_PATH[role][-1].format(factor),)
            n = L * slots[role] * sum(rank * m[dim] for m in mats)
            if n and method.is_shared(path):
                out[(role, factor)] = n
    if p["router"] and method.is_shared(_PATH["router"]):
        out[("router", None)] = p["router"]
    return out


def _value_elements(cfg: ModelConfig, method: Method, server: str) -> int:
    """Elements per row of a server optimizer's value: the shared leaves, or for FlexLoRA each
    shared expert LoRA pair as its product dW [slots, d_in, d_out] per layer and matmul."""
    shared = shared_elements(cfg, method)
    if not server.startswith("flexlora"):
        return sum(shared.values())
    s = shapes(cfg)
    out = sum(n for (role, _), n in shared.items() if role not in ("generalist", "specialist"))
    for role, n_slots in (("generalist", cfg.moe.n_generalists), ("specialist", cfg.moe.n_specialists)):
        if (role, "A") in shared:  # the pair is keyed by its A leaf (servers/ranked.py, product_path)
            out += s.n_layer * n_slots * sum(i * o for _, i, o in s.mlp)
    return out


def server_bytes(cfg: ModelConfig, tc: TrainConfig, method: Method, optimizer: Optional[ServerOptimizer] = None,
                 dp: bool = False, ranked: bool = False) -> dict:
    """Bytes per row of the server's state (PARTS, module docstring) for `method` in tc's mode, with
    the server optimizer `optimizer` (None: server.optimizer=none), DP-FedAvg (`dp`: dp.enabled) and
    per-user ranks (`ranked`: model.ranks set); 0 for every part of a mean without either."""
    from comigs_jax.federated.servers import server_for
    m = method.for_mode(tc.faithful)  # the record a run uses (Simulation)
    srv = server_for(m, ranked, None, dp)
    w = 8 if cfg.dtype == "float64" else 4
    out = dict.fromkeys(PARTS, 0)
    if optimizer is not None:
        out["value"] = w * _value_elements(cfg, m, srv.name)
        copies = 2 if optimizer.name in ADAPTIVE else int(optimizer.momentum > 0)
        out["moments"] = copies * out["value"]
        out["lr"] = w
    if srv.needs_start:
        out["round_start"] = w * sum(shared_elements(cfg, m).values())
    if ranked or srv.ranked:
        out["ranks"] = 2 * 4 + w * (1 + cfg.moe.lora.rank)  # full, current; ratio, scale [r_max]
    if srv.name.startswith("hetlora"):
        modules = shapes(cfg).n_layer * cfg.moe.n_experts * len(shapes(cfg).mlp)
        out["rule"] = w * modules + (4 * modules if srv.name == "hetlora_reference" else 0)
    elif srv.name.startswith("flexlora"):
        out["rule"] = 2 * w  # form, back
    out["total"] = sum(out.values())
    return out
