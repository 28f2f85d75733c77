"""The server interface: one record per aggregation rule (comigs_jax/federated/servers/).

A server is pure functions over pytrees, jitted by the Simulation with the rows split over users:

    state = server.init(setup, rows)                          # round 0: host arrays [rows, ...]
    state = server.start(setup, params, state)                # round 0, when the rule has `start`
    params, state = server.apply(setup, params, inputs, state)  # after a round (server.after_round)

`setup` (a hashable `Setup`) holds what is static: the method's shared roles and factors, the
shared specialist slots, the number of federations (groups). `inputs` is what the round gives the
server: `Uploads` (per-row weights, 0 for padding rows and users that did not upload, and training
tokens, with each row's federation) for the rules that average uploads, or, for PCL
(`inputs="mixing"`), the mixing matrix W [rows, rows] from validation perplexities. `params` are
every row's trainable leaves; a server changes only the leaves its method shares. `state` is a dict
of arrays with a leading row axis (so every federation of a stacked program has its own rows):
the per-row expert LoRA ranks under "ranks" when users have ranks (`rank_state`; HetLoRA's
cuts update them), and whatever else the rule keeps (FlexLoRA's scales). What the checkpoints
hold of it: the ranks in the run's host state (JSON, Simulation.host_states), the keys a server
lists in `saved` with the users' states (Simulation.federation_states).

A rule whose users each receive their own view of one server value per federation (HetLoRA's
truncations, FlexLoRA's SVDs) says how in `stepped` (a `Stepped`), so that a server optimizer
(servers/optimizer.py) can step that value between the aggregation and what the users receive.

`communication` counts what one user sends and receives (comigs_jax.federated.communication's
`accounting` signature). Which server a method uses is `servers.server_for(method, ranked)`, the
one place a server is chosen; the registry is `servers.SERVERS`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INPUTS = ("uploads", "mixing")


class Rows(NamedTuple):
    """What a server's `init` knows of the rows (host NumPy): how many, each row's federation, each
    federation's settings (its dict: seed and the values that may differ between federations,
    configuration.FEDERATION_KEYS), each row's configured expert LoRA rank (None: no ranks) and the
    shapes of a row's trainable leaves (a tree of jax.ShapeDtypeStruct without the row axis; None
    where not given)."""
    n_rows: int
    groups: np.ndarray  # [rows] int32
    federations: tuple = ()
    full_ranks: np.ndarray | None = None
    params: Any = None


class Uploads(NamedTuple):
    """What the users of a round give an averaging server (arrays [rows] on the users axis)."""
    weights: jax.Array  # participation weights (x training tokens with weighting="tokens"); 0: no upload
    n_tokens: jax.Array  # training tokens of the rows that uploaded (FlexLoRA's weights), 0 elsewhere
    groups: jax.Array  # int32: each row's federation
    round_start: Any = None  # servers with needs_start: the shared leaves at the round's start (nested as params)
    noise_keys: Any = None  # with DP (Setup.dp): [F, 2] uint32, each federation's noise key of the round


class Stepped(NamedTuple):
    """A rule split around its server value (flat {path: [rows, ...]}, each federation's rows
    holding copies of one value, or of its truncation to the row's rank):

    agg, ctx = aggregate(setup, params, up, state)       # this round's aggregate, as the value
    params, state, value = distribute(setup, params, up, state, value, ctx)
                                                         # every row its view of `value` (a stepped agg)
    value = start(setup, params, state)                  # round 0: the server value (None: the
                                                         # shared leaves, as the means' value)

    `state` is the rule's own (no server optimizer's keys); `ctx` what distribute needs of the
    aggregation (e.g. HetLoRA's new ranks). Distribute gives every row its view of `value` (HetLoRA:
    the truncation to its rank; FlexLoRA: the factors of its SVD truncation), also the rows whose
    federation had no uploads (a server optimizer's convention: they get the server's value),
    updates the rule's state (ranks, tails) and returns the value as the server keeps it (HetLoRA:
    truncated to each row's new ranks); the stage then writes the value's leaves that are
    parameters (the plainly averaged ones, e.g. the attention LoRA) into the rows."""
    aggregate: Callable
    distribute: Callable
    start: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static side of a server (hashable: part of the jitted program's key)."""
    method: Any  # comigs_jax.federated.methods.Method: shared roles, factors, frozen leaves, PCL schedule
    n_shared_specialists: int
    n_groups: int = 1  # federations on the row axis
    lora: Any = None  # the experts' LoRAConfig (rank scales)
    dp: Any = None  # comigs_jax.federated.privacy.DP: user-level DP of the shared leaves; None: none


def no_state(setup: Setup, rows: Rows) -> dict:
    return {}


def every_round(method, round_index: int) -> bool:
    return True


def never(method, round_index: int) -> bool:
    return False


def _accounting(*args, **kw) -> dict:
    from comigs_jax.federated import communication  # communication imports methods, which validates servers
    return communication.accounting(*args, **kw)


@dataclasses.dataclass(frozen=True)
class Server:
    """One aggregation rule. apply(setup, params, inputs, state) -> (params, state): pure,
    jittable. init(setup, rows: Rows) -> the rule's own state at round 0 (host NumPy arrays
    [rows, ...], each federation's rows its own copy, e.g. from its settings in rows.federations;
    the ranks are added by `rank_state`). after_round(method, r): whether
    it runs after the 0-indexed round r. inputs: "uploads" (`Uploads`) or "mixing" (PCL's W).
    ranked: the rule needs per-row expert ranks even when model.ranks is unset. saved: the keys of
    its state that checkpoints keep with the users' states (arrays [rows, ...]: each federation's
    rows are its run's, as the users' rows) and a resume restores; the rest is rebuilt by `init`
    (the ranks are the host state's, as before this interface). start(setup, params, state) ->
    state: what the rule takes from the round-0 parameters (jitted on the rows; a server
    optimizer's server value and optax state), None: nothing. needs_start: its Uploads carry the
    shared leaves as they were at the start of every round (the server value; the Simulation copies
    them before the round's program, which donates the states). stepped: the rule split around
    its server value (`Stepped`) when its users receive their own views of it (HetLoRA, FlexLoRA);
    None: the rows' aggregate is the value (the means)."""
    name: str
    apply: Callable
    init: Callable = no_state
    inputs: str = "uploads"
    after_round: Callable = every_round
    communication: Callable = _accounting
    ranked: bool = False
    saved: tuple = ()
    description: str = ""
    start: Callable | None = None
    needs_start: bool = False
    stepped: Stepped | None = None

    def __post_init__(self):
        if self.inputs not in INPUTS:
            raise ValueError(f"server {self.name}: inputs={self.inputs!r}: allowed {INPUTS}")


# ----------------------------------------------------------------------------- per-row ranks
def rank_state(full, lora) -> dict:
    """The host arrays of per-row expert LoRA ranks: full [rows] (configured), current [rows]
    (HetLoRA lowers it), ratio [rows] = s(full) / s(r_max) (float64: float32 on a device without
    64-bit JAX, the float64 models' full precision with it), scale [rows, r_max] (the
    model's rank scale: ratio on the components < current, 0 beyond)."""
    from comigs_jax.federated.ranks import lora_scale, rank_scales
    full = np.asarray(full, np.int32)
    ratio = np.array([lora_scale(lora, int(r)) / lora_scale(lora, lora.rank) for r in full], np.float64)
    return {"full": full, "current": full.copy(), "ratio": ratio,
            "scale": rank_scales(full, full, lora, lora.rank)}


def initial_state(server: "Server", setup: Setup, rows: Rows) -> dict:
    """A server's state at round 0 as host arrays [rows, ...], before its `start`: the per-row ranks
    (rank_state of rows.full_ranks; none without ranks) and what its `init` adds."""
    state = {"ranks": rank_state(rows.full_ranks, setup.lora)} if rows.full_ranks is not None else {}
    state.update(server.init(setup, rows))
    return state


def with_current(ranks: dict, current: jax.Array) -> dict:
    """`ranks` at new current ranks (jittable): scale = ratio on the components < current
    (rank_scales' values, bit for bit)."""
    r_max = ranks["scale"].shape[-1]
    on = (jnp.arange(r_max)[None, :] < current[:, None]).astype(ranks["ratio"].dtype)
    return {**ranks, "current": current.astype(ranks["current"].dtype), "scale": on * ranks["ratio"][:, None]}


def round_data(state: dict) -> dict:
    """What the round program reads of the server state: the rank scale and configured ranks, and
    each module's rank where a server keeps them ("module_ranks": HetLoRA as the reference)."""
    if "ranks" not in state:
        return {}
    out = {"rank_full": state["ranks"]["full"], "rank_scale": state["ranks"]["scale"]}
    if "module_ranks" in state:
        out["rank_modules"] = state["module_ranks"]
    return out
