"""From an experiment ConfigDict (configs/base.py) to the engine's typed configs, and the checks
that run before any data or compile work: one line naming the key, the value, what is allowed."""
from __future__ import annotations

import dataclasses
import json
import math
import os

from comigs_jax.data.config import split_list, validate_data_config
from comigs_jax import extras
from comigs_jax.errors import ConfigError
from comigs_jax import rules
from comigs_jax.federated import accounting, privacy
from comigs_jax.federated.methods import METHODS, ROUTER_MODES, Method, configure_model, get_method  # noqa: F401
from comigs_jax.model import family as families
from comigs_jax.model.config import DTYPES, LB_INPUTS, LORA_SCALINGS, REMAT, LoRAConfig, MoEConfig
from comigs_jax.model.lm import ModelConfig
from comigs_jax.model.precision import missing_x64
from comigs_jax.train.evaluation import PROTOCOLS
from comigs_jax.train.state import ROW_HPARAMS, TrainConfig

from comigs_jax.federation_config import (  # noqa: F401 (the names callers import from here)
    FEDERATION_KEYS, MODES, SIT_OUT, WEIGHTINGS, FederationConfig, FederationError, check_federations)


def _config_error(cfg, e: FederationError) -> ConfigError:
    """A FederationError as the config's one line, quoting the value as the config holds it."""
    raw = {"model.ranks": cfg.model.get("ranks"), "model.expert_counts": cfg.model.expert_counts}
    return ConfigError(f"config.{e.key}={raw.get(e.key, e.value)!r} is not allowed: {e.allowed}")


def federation_config(cfg, federations=None) -> FederationConfig:
    """The FederationConfig of `cfg` (its seed alone, or `federations`): built and checked here,
    with its DP settings (sigma calibrated to dp.target_epsilon when set)."""
    fe, opt = cfg.federation, rules.server_optimizer_of(cfg)
    try:
        feds = federations or [rules.with_server_lr(cfg, {"seed": seeds_of(cfg)[0]})]
        return FederationConfig(tuple(feds), fe.mode, fe.weighting, fe.participation, fe.get("dropout", 0.0), ranks_of(cfg),
                                tuple(expert_counts_of(cfg)) if cfg.model.expert_counts else None, opt,
                                fe.get("sit_out", "skip"), fe.get("sampling", "fixed"), accounting.from_config(cfg))
    except (FederationError, privacy.PrivacyError) as e:
        raise _config_error(cfg, e) from None


def _fail(key, value, allowed):
    raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def methods_of(cfg) -> list[str]:
    return split_list(cfg.methods) or [cfg.method]


def seeds_of(cfg) -> list[int]:
    try:
        return [int(s) for s in split_list(cfg.seeds)] or [int(cfg.seed)]
    except ValueError:
        _fail("seeds", cfg.seeds, "comma-separated integers")


def expert_counts_of(cfg) -> list[int]:
    """Experts per user (model.expert_counts, parsed; FederationConfig.check checks them), or
    model.n_experts for every user when unset."""
    n_users = cfg.data.n_users
    if not cfg.model.expert_counts:
        return [cfg.model.n_experts] * n_users
    try:
        return [int(c) for c in split_list(cfg.model.expert_counts)]
    except ValueError:
        _fail("model.expert_counts", cfg.model.expert_counts, "comma-separated integers, one per user")


def ranks_of(cfg) -> list[int] | None:
    """Per-user expert LoRA ranks (model.ranks, parsed; FederationConfig.check checks them), None
    when unset."""
    if not cfg.model.get("ranks", ""):
        return None
    try:
        return [int(r) for r in split_list(cfg.model.ranks)]
    except ValueError:
        _fail("model.ranks", cfg.model.ranks, "comma-separated integers, one per user")


def base_positions(cfg) -> int | None:
    """n_positions of the configured base, read cheaply (None when unknown before download)."""
    if cfg.base == "pretrain":
        return None
    sized = families.family_of_size(cfg.base.lower())
    if sized is not None and "n_positions" in sized.sizes[cfg.base.lower()]:
        return sized.sizes[cfg.base.lower()]["n_positions"]
    path = os.path.join(os.path.expanduser(cfg.base), "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                hf = json.load(f)
            return hf.get("n_positions") or hf.get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return None  # the loader reports a damaged config.json, naming the file
    hub = families.family_of_hub_id(cfg.base)  # a hub id named after its family (GPT-2's 1,024)
    return None if hub is None else hub.config().n_positions


def _base_family(cfg) -> str | None:
    """The configured base's family name when it is known without loading the base, else None."""
    if cfg.base == "pretrain":
        return families.PRETRAIN
    fam = families.family_of_size(cfg.base.lower()) or families.family_of_hub_id(cfg.base)
    path = os.path.expanduser(cfg.base)
    if fam is None and os.path.isdir(path):
        try:
            fam = families.checkpoint_family(path)
        except Exception:  # the loader reports a damaged checkpoint, naming the file
            return None
    return None if fam is None else fam.name


def validate_model(mo, counts=None, group: str = "model") -> None:
    """The checks of a `model` group (configs/base.py); `counts`: the per-user expert counts
    (expert_counts_of) when model.expert_counts is set. `group`: its dotted name in messages."""
    k = lambda key: f"{group}.{key}"
    if mo.dtype not in DTYPES:
        _fail(k("dtype"), mo.dtype, f"one of {DTYPES}")
    if missing_x64(mo.dtype):
        _fail(k("dtype"), mo.dtype, "float64 needs 64-bit JAX (JAX_ENABLE_X64=1 in the environment); without it "
                                    "float32 or bfloat16")
    if mo.lora_scaling not in LORA_SCALINGS:
        _fail(k("lora_scaling"), mo.lora_scaling, f"one of {LORA_SCALINGS}")
    if mo.lb_input not in LB_INPUTS:
        _fail(k("lb_input"), mo.lb_input, f"one of {LB_INPUTS}")
    if mo.get("router_kind", "learned") not in ("learned", "noisy_topk"):
        _fail(k("router_kind"), mo.router_kind, "learned | noisy_topk (the Llama reference's gate)")
    if mo.get("router_kind") == "noisy_topk" and mo.expert_counts:
        _fail(k("router_kind"), mo.router_kind, "learned with model.expert_counts (noisy_topk needs every user at n_experts)")
    if mo.get("remat", "none") not in REMAT:
        _fail(k("remat"), mo.remat, f"one of {REMAT}")
    head_block = mo.get("head_block", 0)
    if not isinstance(head_block, int) or head_block < 0:
        _fail(k("head_block"), head_block, "an integer >= 0 (0 = the full logits)")
    if mo.rank <= 0:
        _fail(k("rank"), mo.rank, "a positive integer")
    if mo.attn_rank < 0:
        _fail(k("attn_rank"), mo.attn_rank, "a non-negative integer (0 = no attention LoRA)")
    counts = list(counts) if mo.expert_counts and counts else []
    n_experts = max(counts) if counts else mo.n_experts
    if n_experts < 1:
        _fail(k("n_experts"), n_experts, "at least 1")
    if not 0 <= mo.n_generalists < n_experts:
        _fail(k("n_generalists"), mo.n_generalists, f"in [0, {n_experts - 1}] (fewer than the {n_experts} experts)")
    for c in counts:
        if c < max(mo.n_generalists, 1):
            _fail(k("expert_counts"), mo.expert_counts,
                  f"every user needs at least max(1, n_generalists={mo.n_generalists}) experts")
    if not 1 <= mo.top_k <= n_experts:
        _fail(k("top_k"), mo.top_k, f"in [1, {n_experts}] (the number of experts)")
    if not 0 <= mo.importance < 1:
        _fail(k("importance"), mo.importance, "in [0, 1)")
    if not 0 <= mo.dropout < 1:
        _fail(k("dropout"), mo.dropout, "in [0, 1)")
    if not (mo.alpha > 0 and math.isfinite(mo.alpha)):
        _fail(k("alpha"), mo.alpha, "a positive finite number")


def validate_train(tr, group: str = "train") -> None:
    """The checks of a `train` group (configs/base.py)."""
    k = lambda key: f"{group}.{key}"
    for key in ("rounds", "local_steps", "batch_size", "seq_len", "router_every"):
        if tr[key] <= 0:
            _fail(k(key), tr[key], "a positive integer")
    if tr.router_steps < 0:
        _fail(k("router_steps"), tr.router_steps, "a non-negative integer")
    for key in ("lr", "router_lr"):
        if not (isinstance(tr[key], (int, float)) and tr[key] > 0 and math.isfinite(tr[key])):
            _fail(k(key), tr[key], "a positive finite number")
    if not 0 <= tr.lr_final_ratio <= 1:
        _fail(k("lr_final_ratio"), tr.lr_final_ratio, "in [0, 1]")
    for key in ("weight_decay", "lb_weight", "prune_lambda", "prox_mu"):
        if key in tr and not (tr[key] >= 0 and math.isfinite(tr[key])):
            _fail(k(key), tr[key], "a non-negative finite number")
    chunk = tr.get("user_chunk", 0)
    if not isinstance(chunk, int) or chunk < 0:
        _fail(k("user_chunk"), chunk, "an integer >= 0 (0 = all of a device's users at once)")


def validate(cfg) -> None:
    """Every check that needs no data and no compile; raises ConfigError (one line)."""
    for m in methods_of(cfg):
        if m not in METHODS:
            _fail("methods" if cfg.methods else "method", m, f"one of {', '.join(sorted(METHODS))}")
    seeds_of(cfg)
    if cfg.data.n_users < 1:
        _fail("data.n_users", cfg.data.n_users, "at least 1 user")
    validate_model(cfg.model, expert_counts_of(cfg))
    kind, fam = cfg.model.get("router_kind", "learned"), _base_family(cfg)
    if fam is not None and kind not in families.family_named(fam).router_kinds:  # the family's record says
        allowed = [r for r in families.family_named(fam).router_kinds if r in ("learned", "noisy_topk")]
        _fail("model.router_kind", kind, f"{' | '.join(allowed)} with a {families.family_named(fam).label} base "
              "(noisy_topk is the Llama reference's gate)")
    validate_train(cfg.train)
    ranks_of(cfg)
    tr = cfg.train
    for s in ("train", "valid", "test"):  # every split must hold one window of seq_len + 1 tokens
        if cfg.data[f"{s}_tokens"] < tr.seq_len + 1:
            _fail(f"data.{s}_tokens", cfg.data[f"{s}_tokens"], f"at least one window: train.seq_len + 1 = {tr.seq_len + 1}")
    pos = base_positions(cfg)
    if pos is not None and tr.seq_len > pos:
        _fail("train.seq_len", tr.seq_len, f"at most the base's {pos} positions")
    fed = federation_config(cfg)  # mode, weighting, participation, drop-outs, the server optimizer
    n_experts = max(expert_counts_of(cfg)) if cfg.model.expert_counts else cfg.model.n_experts
    for m in methods_of(cfg):  # PCL's limits, expert counts, ranks, what the server optimizer and FedProx need
        rules.check_prox(tr.get("prox_mu", 0.0), METHODS[m])
        try:
            fed.check(METHODS[m], cfg.data.n_users, n_experts, cfg.model.n_generalists, cfg.model.rank)
            if fed.dp is not None:  # a model where the method's shared roles hold no leaf shares nothing
                privacy.check_shares(METHODS[m], cfg.model.attn_rank, n_experts, cfg.model.n_generalists)
        except (FederationError, privacy.PrivacyError) as e:
            raise _config_error(cfg, e) from None
    if cfg.eval.protocol not in PROTOCOLS:
        _fail("eval.protocol", cfg.eval.protocol, f"one of {PROTOCOLS}")
    for key in ("n_windows", "batch_size", "every_rounds"):
        if cfg.eval[key] <= 0:
            _fail(f"eval.{key}", cfg.eval[key], "a positive integer")
    limit = cfg.output.get("per_user_limit", 1)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        _fail("output.per_user_limit", limit, "a positive integer (the most users shown one by one)")
    for key in ("every_rounds", "max_to_keep"):
        if cfg.checkpoint[key] <= 0:
            _fail(f"checkpoint.{key}", cfg.checkpoint[key], "a positive integer")
    if not isinstance(cfg.checkpoint.get("async_save", True), bool):
        _fail("checkpoint.async_save", cfg.checkpoint.async_save, "True (write in the background) or False")
    if cfg.base == "pretrain":
        p = cfg.get("pretrain")
        if p is None:
            _fail("base", cfg.base, "a GPT-2 size here (this config has no `pretrain` group for the small base)")
        for key in ("n_layer", "n_embd", "n_head", "steps", "batch_size"):
            if p[key] <= 0:
                _fail(f"pretrain.{key}", p[key], "a positive integer")
        if p.n_embd % p.n_head:
            _fail("pretrain.n_head", p.n_head, f"a divisor of pretrain.n_embd={p.n_embd}")
        if not (p.lr > 0 and math.isfinite(p.lr)):
            _fail("pretrain.lr", p.lr, "a positive finite number")
        if p.tokens < tr.seq_len + 1:
            _fail("pretrain.tokens", p.tokens, f"at least one window: train.seq_len + 1 = {tr.seq_len + 1}")
        text = p.get("text", "")
        if text and not os.path.isdir(os.path.expanduser(text)):
            _fail("pretrain.text", text, "'' (the synthetic base chain) or an existing folder of .jsonl/.txt text "
                  "(e.g. the .heldout folder of `prepare_local_corpus --many-users`)")
    try:  # the data first: an unknown source is the error, not the base that needs another one
        validate_data_config(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.distributed.mode not in ("auto", "always", "never"):
        _fail("distributed.mode", cfg.distributed.mode, "auto | always | never")
    if cfg.distributed.num_processes < 0:
        _fail("distributed.num_processes", cfg.distributed.num_processes, "0 (detect) or the number of processes")
    if cfg.base == "pretrain" and cfg.data.source != "synthetic" and not cfg.pretrain.get("text", ""):
        _fail("base", cfg.base, "'pretrain' only with data.source='synthetic' or a pretrain.text folder; else a GPT-2 "
              "or Llama directory or hub id, 'smollm2-135m' or a .gguf file")
    extras.check_config(cfg)  # an optional package the config needs (gguf, tensorboardX, wandb): one line


def model_config(cfg, base_cfg: ModelConfig) -> ModelConfig:
    """The CoMiGS model on the given base: attention LoRA and a mixture of LoRA experts (reads
    cfg.data.n_users only when model.expert_counts is set)."""
    mo = cfg.model
    n_experts = max(expert_counts_of(cfg)) if mo.expert_counts else mo.n_experts
    lora = lambda r: LoRAConfig(rank=r, alpha=mo.alpha, scaling=mo.lora_scaling, dropout=mo.dropout)
    moe = MoEConfig(n_experts=n_experts, n_generalists=mo.n_generalists,
                    top_k=mo.top_k, lora=lora(mo.rank), lb_input=mo.lb_input, importance=mo.importance,
                    router=mo.get("router_kind", "learned"))
    execution = {k: mo[k] for k in ("remat", "head_block") if k in mo}  # the same math, other memory
    return dataclasses.replace(base_cfg, attn_lora=lora(mo.attn_rank) if mo.attn_rank else None, moe=moe,
                               dtype=mo.dtype, **execution)


def train_config(cfg) -> TrainConfig:
    tr = cfg.train
    return TrainConfig(rounds=tr.rounds, local_steps=tr.local_steps, batch_size=tr.batch_size, seq_len=tr.seq_len,
                       lr=tr.lr, lr_final_ratio=tr.lr_final_ratio, router_lr=tr.router_lr,
                       weight_decay=tr.weight_decay, router_every=tr.router_every, router_steps=tr.router_steps,
                       lb_weight=tr.lb_weight, faithful=tr.faithful, prune_lambda=tr.get("prune_lambda", 0.0),
                       prox_mu=tr.get("prox_mu", 0.0))


def federation_of(cfg, seed: int) -> dict:
    """The run (cfg, seed) as a federation of a Simulation: its seed, row hyper-parameters and
    server lr."""
    tc = train_config(cfg)
    return rules.with_server_lr(cfg, {"seed": int(seed), **{k: getattr(tc, k) for k in ROW_HPARAMS}})



# ----------------------------------------------------------------------------- without a base

BASE_SHAPES = (*families.named_sizes(), "pretrain")


def base_shape(cfg) -> ModelConfig:
    """The frozen base's shape from the config alone, nothing loaded (experiments.bench and
    comigs_jax.capacity): `cfg.base` a GPT-2 hub size (GPT2_SIZES, 1024 positions), a Llama size
    (LLAMA_SIZES: smollm2-135m, llama-3.2-1b), or "pretrain", the small base experiments.run
    trains (cfg.pretrain's n_layer, n_embd, n_head; train.seq_len positions, as
    comigs_jax.experiment.base_model builds it); vocabulary `cfg.vocab_size`, 0 for the named
    base's own (a Llama size's; GPT-2's 50,257 for the GPT-2 sizes and "pretrain", which
    experiments.run trains on GPT-2 tokens)."""
    seq_len = cfg.train.seq_len
    if cfg.base == "pretrain":
        p = cfg.get("pretrain")
        if p is None:
            _fail("base", cfg.base, "a GPT-2 size here (this config has no `pretrain` group for the small base)")
        for key in ("n_layer", "n_embd", "n_head"):
            if p[key] <= 0:
                _fail(f"pretrain.{key}", p[key], "a positive integer")
        if p.n_embd % p.n_head:
            _fail("pretrain.n_head", p.n_head, f"a divisor of pretrain.n_embd={p.n_embd}")
        family = families.family_named(families.PRETRAIN)
        base = family.config(n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head, n_positions=seq_len)
    else:
        family = families.family_of_size(cfg.base)
        if family is None:
            _fail("base", cfg.base, " | ".join(BASE_SHAPES) + " (a base's shape by name; nothing is loaded)")
        base = family.sized(cfg.base)
    if seq_len > base.n_positions:
        _fail("train.seq_len", seq_len, f"at most the base's {base.n_positions} positions")
    vocab = cfg.vocab_size
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 0 or vocab == 1:
        _fail("vocab_size", vocab, "0 (the base's own vocabulary) or an integer >= 2")
    return dataclasses.replace(base, vocab_size=vocab or base.vocab_size)


def engine_configs(cfg, method: str | None = None) -> tuple[ModelConfig, TrainConfig, Method]:
    """(model config, train config, method) of a config with `base`, `vocab_size`, `pretrain`
    (for base="pretrain"), `model` and `train` groups as in configs/base.py, without loading a
    base: what experiments.bench and comigs_jax.capacity run and count. `method`: a method name
    (default cfg.method). ConfigError (one line) for a value that is not allowed."""
    name = method or cfg.method
    if name not in METHODS:
        _fail("method", name, f"one of {', '.join(sorted(METHODS))}")
    if cfg.model.expert_counts:
        _fail("model.expert_counts", cfg.model.expert_counts, "'' here: every user has model.n_experts experts")
    validate_model(cfg.model)
    validate_train(cfg.train)
    m = get_method(name)
    return configure_model(model_config(cfg, base_shape(cfg)), m), train_config(cfg), m
