"""Roles of parameters: which leaves are frozen, shared across users, or kept local.

Every leaf of the model's parameter tree has exactly one role, decided by its path:

- ``base``: the frozen GPT-2 (embeddings, LayerNorms, kernels, biases). Shared by all users,
  never stacked on the user axis, never trained.
- ``attn``: the attention LoRA factors (``lora_A``, ``lora_B`` of c_attn and c_proj).
- ``generalist``: the LoRA factors of expert slots ``< n_generalists`` (``mlp/generalists``).
- ``specialist``: the other expert slots (``mlp/specialists``).
- ``router``: the per-block router kernel.

A method (comigs_jax.federated.methods) decides collaboration from these labels alone.

Expert leaves hold their slots on one axis: the first, or the second under a scanned stack of
blocks (Llama's `layers`, whose leaves lead with [L]); `slot_axis` says which.
"""
from __future__ import annotations

from typing import Iterable

from flax import traverse_util

ROLES = ("base", "attn", "generalist", "specialist", "router")
TRAINABLE_ROLES = ("attn", "generalist", "specialist", "router")
EXPERT_ROLES = ("attn", "generalist", "specialist")  # trained by the expert optimizer


def role_of(path: tuple) -> str:
    """The role of the leaf at `path` (a tuple of keys), e.g. ('h_0', 'router', 'kernel')."""
    if "generalists" in path:
        return "generalist"
    if "specialists" in path:
        return "specialist"
    if "router" in path:
        return "router"
    if path[-1] in ("lora_A", "lora_B"):
        return "attn"
    return "base"


SCANNED_STACKS = ("layers",)  # top-level modules whose leaves lead with a layer axis (comigs_jax.model.llama)


def slot_axis(path: tuple) -> int:
    """The expert-slot axis of an expert leaf at `path` (no user axis): 1 under a scanned stack of
    blocks ([L, slots, ...]), else 0 ([slots, ...])."""
    return 1 if path[0] in SCANNED_STACKS else 0


def factor_of(path: tuple) -> str | None:
    """"A" or "B" for a LoRA factor (attention `lora_A` / `lora_B`, expert `<matmul>_A` /
    `<matmul>_B`), None for any other leaf (routers, the base)."""
    last = path[-1]
    return last[-1] if last[-2:] in ("_A", "_B") else None


def filter_leaves(params: dict, keep) -> dict:
    """The sub-tree of the leaves whose path satisfies keep(path) (structure kept, others dropped)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)})


def label_params(params: dict) -> dict:
    """A tree of the same structure as `params` holding each leaf's role."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: role_of(p) for p in flat})


def filter_roles(params: dict, roles: Iterable[str]) -> dict:
    """The sub-tree of the leaves whose role is in `roles` (structure kept, other leaves dropped)."""
    roles = frozenset(roles)
    unknown = roles - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}: allowed {ROLES}")
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if role_of(p) in roles})


def split_base(params: dict) -> tuple[dict, dict]:
    """(base, trainable): the frozen GPT-2 and every adapter leaf."""
    return filter_roles(params, ("base",)), filter_roles(params, TRAINABLE_ROLES)


def merge(*trees: dict) -> dict:
    """Union of disjoint parameter sub-trees (e.g. base and trainable) into one tree."""
    flat = {}
    for t in trees:
        for p, v in traverse_util.flatten_dict(t).items():
            if p in flat:
                raise ValueError(f"merge: leaf {'/'.join(p)} appears twice")
            flat[p] = v
    return traverse_util.unflatten_dict(flat)
