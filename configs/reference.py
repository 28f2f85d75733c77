"""The reference's run scripts (epfml/CoMiGS `collab_runscripts/`, Tables 1 and 4) as configs.

    python -m experiments.run --config=configs/reference.py:comigs_1g1s \\
        --config.base=/path/to/gpt2 --config.data.dir=/path/to/data --config.seed=42

One argument per script; each sets that script's values (rounds, local steps, batch, learning
rates, experts, k, router cadence and iterations, load-balancing weight and importance,
strategy) and reads the reference runner's data layout `<data.dir>/4/{train,valid,test}_{i}.bin`
(data.source = "reference_bins"). `SCRIPTS` below is the one source of truth: `get_config` builds
every config from it, and docs/reproducing.md's table is generated from those configs
(`python -m configs.reference` rewrites it; tests/test_reproduce.py checks it is current).
"""
from __future__ import annotations

import dataclasses
import os

from configs import base


@dataclasses.dataclass(frozen=True)
class Script:
    """One reference run script and the values it passes (method.md §3, §7)."""

    script: str  # path in epfml/CoMiGS, release 77efb25
    table: str  # the paper's table
    method: str  # comigs_jax.federated.methods record that reproduces it
    strategy: str  # -as: expert_0 | experts | all (method.md §2)
    router: str  # bilevel (-is_alter) | alternating_train (-is_alter -alter_on_train) | joint | none (-is_no_router)
    rounds: int  # R
    local_steps: int  # S
    clients: int = 4  # -nc (Centralized: 1 pooled client)
    batch: int = 64  # sequences per step (Centralized: 256)
    lb_weight: float = 0.01  # -lb_lam (baseline_PCL.sh: 0.0)
    experts: int = 2  # -en per user (Tables 2 and 4's LoRA baselines: 1 expert, k = 1)
    rank: int = 8  # -el: the expert LoRA rank (the padded rank when `ranks` differ)
    ranks: str = ""  # per-user ranks named by the script, e.g. "16,32,32,32" ("" = rank for all)
    prune_lambda: float = 0.0  # -p_lam of the pruning regulariser (0 = off)
    commit: str = "77efb25"  # the code it runs: epfml/CoMiGS 77efb25, or 2d42464 (the ICML scripts, comigs-icml2025/codebase)
    lr: float = 2e-3  # -lr: experts (cosine to lr/10); the router's constant lr (2d42464: -learning_rate_scale 1 x lr)
    router_lr: float = 2e-3
    base: str = "gpt2"  # -bm; "llama-3.2-1b" names meta-llama/Llama-3.2-1B: run with --config.base=DIR (its HF folder)
    router_kind: str = "learned"  # model.router_kind: noisy_topk = 2d42464's Llama gate


# Values every script passes: 4 users, -el [8,8,8,8] -en [2,2,2,2] -k 2, lr 2e-3, imp 0.5,
# lb 0.01, router phases of 10 steps after every 30th expert step (method.md §3, §7).
COMMON = {
    "model.n_experts": 2, "model.n_generalists": 1, "model.top_k": 2, "model.rank": 8, "model.attn_rank": 8,
    "model.alpha": 16.0, "model.lora_scaling": "rslora", "model.dropout": 0.0, "model.importance": 0.5,
    "model.lb_input": "block_output", "train.seq_len": 128, "train.lr": 2e-3, "train.lr_final_ratio": 0.1,
    "train.router_lr": 2e-3, "train.weight_decay": 0.01, "train.router_every": 30, "train.router_steps": 10,
    "train.lb_weight": 0.01, "federation.weighting": "uniform", "federation.participation": 1.0,
    "data.n_users": 4,
}

_T1, _T2, _T4 = "collab_runscripts/table1/", "collab_runscripts/table2/", "collab_runscripts/table4/"
# Table 2: one rank-r_i expert per user (E = 1, k = 1), `all`. A script named by four ranks gives
# users 0..3 those ranks; FlexLoRA's two-rank names give user 0 the first and users 1..3 the second
# (the reading under which D3b's factors hold, method.md §8). HetLoRA sweeps λ_p in {5e-2, 5e-3,
# 5e-4} (--config.train.prune_lambda; 5e-3 here); FlexLoRA runs the default -p_lam 0.01.
_LORA = dict(experts=1)


def _table2(kind: str, ranks: str, prune_lambda: float):
    name = f"baseline_hetlora_lambda_sweep_{ranks}.sh" if kind == "hetlora" else f"baseline_flexlora_{ranks}.sh"
    per_user = [ranks[i:i + 2] for i in range(0, len(ranks), 2)]
    per_user = per_user if len(per_user) == 4 else per_user[:1] + per_user[1:] * 3
    return (f"{kind}_{ranks}", Script(_T2 + name, "2", kind, "all", "none", 20, 10, **_LORA, rank=max(map(int, per_user)),
                                      ranks=",".join(per_user), prune_lambda=prune_lambda))


_ICML = "2d42464"  # ICML scripts (comigs-icml2025/codebase 2ac0eac) running 2d42464's code
# Table 1's Llama-3.2-1B scripts (method.md Appendix A): the reference's noisy top-k router, -el 8 (the
# default, also the attention LoRA rank), micro-batch 64. D6: a missing line continuation drops
# `-lr 2e-4`, so all but pFedMoE_llama.sh ran the default 2e-3 (the router: 1.0 x lr, constant);
# `_llama` runs as actually run, `_llama_intended` with 2e-4.
_LLAMA = [("comigs_1g1s", "comigs_1g1s_llama.sh", "comigs", "expert_0", "bilevel", 20, 10),
          ("comigs_2g", "comigs_2g_llama.sh", "comigs_2g", "experts", "bilevel", 20, 10),
          ("comigs_2s", "comigs_2s_llama.sh", "comigs_2s", "expert_0", "bilevel", 1, 200),
          ("fedavg", "baseline_fedavg_llama.sh", "fedavg", "experts", "none", 20, 10),
          ("local", "baseline_local_llama.sh", "local", "all", "none", 1, 200),
          ("pfedmoe", "pFedMoE_llama.sh", "pfedmoe", "expert_0", "joint", 20, 10)]


def _llama(arg: str, script: str, *rest):
    """(`<arg>_llama`, as run) and (`<arg>_llama_intended`, lr 2e-4) of a Llama script; pFedMoE_llama.sh
    passes its -lr 2e-4 (one config)."""
    llama = dict(commit=_ICML, base="llama-3.2-1b", router_kind="noisy_topk")
    s = Script(_T1 + script, "1", *rest, **llama)
    if arg == "pfedmoe":
        return [(f"{arg}_llama", dataclasses.replace(s, lr=2e-4, router_lr=2e-4))]
    return [(f"{arg}_llama", s), (f"{arg}_llama_intended", dataclasses.replace(s, lr=2e-4, router_lr=2e-4))]


SCRIPTS = {s_arg: s for s_arg, s in [
    ("comigs_1g1s", Script(_T1 + "comigs_1g1s.sh", "1", "comigs", "expert_0", "bilevel", 20, 10)),
    ("comigs_2g", Script(_T1 + "comigs_2g.sh", "1", "comigs_2g", "experts", "bilevel", 20, 10)),
    ("comigs_2s", Script(_T1 + "comigs_2s.sh", "1", "comigs_2s", "expert_0", "bilevel", 1, 200)),
    ("pfedmoe", Script(_T1 + "pFedMoE.sh", "1", "pfedmoe", "expert_0", "joint", 20, 10)),
    ("fedavg", Script(_T1 + "baseline_fedavg.sh", "1", "fedavg", "experts", "none", 20, 10)),
    ("local", Script(_T1 + "baseline_local.sh", "1", "local", "all", "none", 1, 200)),
    ("centralized", Script(_T1 + "baseline_centralized.sh", "1", "centralized", "all", "none", 1, 200,
                           clients=1, batch=256)),
    # collab_run_client_level.py: no server, no -as (its default `all` names what PCL mixes: everything)
    ("pcl", Script(_T1 + "baseline_PCL.sh", "1", "pcl", "all", "none", 20, 10, lb_weight=0.0)),
    *[_table2("hetlora", r, 5e-3) for r in ("16161616", "16323232", "32161616")],
    *[_table2("flexlora", r, 0.01) for r in ("1616", "1632", "3216")],
    ("comigs_train", Script(_T4 + "baseline_comigs_train.sh", "4", "comigs_train", "expert_0",
                            "alternating_train", 20, 10)),
    ("fedavg_moe", Script(_T4 + "baseline_fedavg_moe.sh", "4", "fedavg_moe", "experts", "joint", 20, 10)),
    ("fedavg_moe_train", Script(_T4 + "baseline_fedavg_moe_train.sh", "4", "fedavg_moe_train", "experts",
                                "alternating_train", 20, 10)),
    ("local_moe", Script(_T4 + "baseline_local_moe.sh", "4", "local_moe", "all", "joint", 1, 200)),
    ("local_moe_train", Script(_T4 + "baseline_local_moe_train.sh", "4", "local_moe_train", "all",
                               "alternating_train", 1, 200)),
    # -as ffalora -is_alter -gating_update_iters 0 with one expert: no router step; -p_lam default 0.01
    # (faithful: 77efb25's Expert0CollaborationStrategy, with one expert FedAvg of A and B)
    ("ffalora_1616", Script(_T4 + "baseline_ffalora_1616.sh", "4", "ffa_lora_77efb25", "ffalora", "none", 20, 10,
                            **_LORA, rank=16, prune_lambda=0.01)),
    # the ICML scripts on 2d42464's code: no --is_pruning; FedSA-LoRA's -is_alter runs 0 router steps
    ("ffalora_1616_2d42464", Script(_T4 + "baseline_ffalora_1616.sh", "4", "ffa_lora", "ffalora", "none", 20, 10,
                                    **_LORA, rank=16, commit=_ICML)),
    ("fedsalora_1616", Script(_T4 + "baseline_fedsalora_1616.sh", "4", "fedsa_lora", "fedsalora", "none", 20, 10,
                              **_LORA, rank=16, commit=_ICML)),
    *[pair for arg, script, *rest in _LLAMA for pair in _llama(arg, script, *rest)],
]}

# Scripts of those tables with no config here (their engines are not implemented).
NOT_AVAILABLE: dict[str, str] = {}

EVAL_EVERY_STEPS = 20  # the reference evaluates every 20 expert steps (method.md §5)


def get_config(arg=None):
    if arg not in SCRIPTS:
        raise ValueError(f"configs/reference.py:{arg}: allowed {', '.join(SCRIPTS)} "
                         f"(not available: {'; '.join(NOT_AVAILABLE.values())})")
    s = SCRIPTS[arg]
    c = base.get_config(s.method)
    for key, value in COMMON.items():
        group, name = key.split(".")
        c[group][name] = value
    c.train.lb_weight = s.lb_weight
    c.model.n_experts, c.model.rank, c.model.ranks = s.experts, s.rank, s.ranks
    if s.experts == 1:  # one expert: no generalist slot, k = 1 (the reference's one-expert bypass)
        c.model.n_generalists, c.model.top_k = 0, 1
    c.train.prune_lambda = s.prune_lambda
    c.train.lr, c.train.router_lr, c.model.router_kind = s.lr, s.router_lr, s.router_kind
    c.base = s.base  # --config.base=DIR for a local GPT-2 (Llama) directory
    c.seed = 42  # the scripts' seeds: 42, 45, 47 (--config.seeds=42,45,47 runs all three)
    # R = 1 x S = 200 scripts run as 20 rounds x 10 steps without aggregation (one_round methods):
    # the same schedule, optimiser states and router cadence, with evaluations every 20 steps.
    total = s.rounds * s.local_steps
    c.train.local_steps = s.local_steps if s.rounds > 1 else 10
    c.train.rounds = total // c.train.local_steps
    # Centralized: the engine trains one model on the pooled users with batch x n_users.
    c.train.batch_size = s.batch // (c.data.n_users if s.clients == 1 else 1)
    c.train.faithful = True  # the reference's defects: gradient leaks D1, D2; FlexLoRA's scales D3b (--config.train.faithful=False: clean)
    c.eval.n_windows = 6400  # protocol `reference`: 100 random batches x 64 windows
    c.eval.batch_size = 64
    c.eval.every_rounds = EVAL_EVERY_STEPS // c.train.local_steps
    c.checkpoint.every_rounds = 5
    c.data.source = "reference_bins"
    c.data.dir = ""  # --config.data.dir=DIR holding 4/{train,valid,test}_{i}.bin
    c.data.tokenizer = "gpt2" if s.base == "gpt2" else "base"  # decoding only (routing pictures); the vocabulary ids are checked against
    c.data.dtype = "auto"  # uint16 for GPT-2's vocabulary; "uint32" for uint32 files
    return c


# ----------------------------------------------------------------------------- docs table
_ROUTER_WORDS = {"bilevel": "alternating, valid", "alternating_train": "alternating, train",
                 "joint": "joint", "none": "none (uniform)"}
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "reproducing.md")
BEGIN, END = "<!-- scripts-table: generated by `python -m configs.reference`; do not edit -->", "<!-- /scripts-table -->"


def markdown_table() -> str:
    """The script -> command table of docs/reproducing.md, from the configs themselves."""
    head = ("| Reference script (Table) | code | Command: `--config=configs/reference.py:ARG` | method | strategy (`-as`) "
            "| router | R × S (reference) | rounds × steps here | batch | E, k, rank | lr (experts, router) "
            "| router phase | λ_lb, imp (, λ_p) | faithful |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arg, s in SCRIPTS.items():
        c = get_config(arg)
        t, m = c.train, c.model
        batch = f"{t.batch_size}" + (f" × {c.data.n_users} users = {t.batch_size * c.data.n_users}"
                                     if s.clients == 1 else "")
        sync = "" if s.rounds > 1 else ", no sync"
        lines.append(
            f"| `{os.path.basename(s.script)}` ({s.table}) | {s.commit}{', Llama' if s.base != 'gpt2' else ''} | `:{arg}` | `{c.method}` | `{s.strategy}` "
            f"| {_ROUTER_WORDS[s.router]}{', noisy top-k' if s.router_kind == 'noisy_topk' and s.router != 'none' else ''} | {s.rounds} × {s.local_steps} | {t.rounds} × {t.local_steps}{sync} "
            f"| {batch} | {m.n_experts}, {m.top_k}, {m.ranks.replace(',', '/') or m.rank} | {t.lr:g}, {t.router_lr:g} "
            f"| {f'{t.router_steps} every {t.router_every}' if s.router in ('bilevel', 'alternating_train') else '–'} "
            f"| {t.lb_weight:g}, {m.importance:g}{f', {t.prune_lambda:g}' if t.prune_lambda else ''} | {t.faithful} |")
    return "\n".join(lines)


def doc_block() -> str:
    return f"{BEGIN}\n{markdown_table()}\n{END}"


def write_docs(path: str = DOC) -> None:
    with open(path) as f:
        text = f.read()
    i, j = text.index(BEGIN), text.index(END) + len(END)
    with open(path, "w") as f:
        f.write(text[:i] + doc_block() + text[j:])


if __name__ == "__main__":
    write_docs()
    print(f"wrote the scripts table of {DOC}")
