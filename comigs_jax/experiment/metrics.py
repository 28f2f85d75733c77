"""Metrics of a run: per-round records (metrics.jsonl), results (results.json / .md), and the
paper-style comparison table across methods and seeds."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref

import numpy as np
import optax

from comigs_jax.experiment import distribution, statistics, study_report
from comigs_jax.experiment.provenance import provenance
from comigs_jax.train.state import TrainConfig


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON line per round; truncates to a checkpoint's round on resume.

    path=None (the other processes of a multi-process run): the records stay in memory and no
    file is touched (never a stand-in path such as os.devnull: an atomic rewrite would replace
    the device file itself).

    tensorboard=True (and a path): every record is also written as TensorBoard scalars
    (`tensorboard_scalars`, step = round) to the folder `tensorboard/` beside the file. The events
    are a view of metrics.jsonl: `truncate` (every start, fresh or resumed) deletes the folder's
    event files and writes the kept records again into one new file, so a resumed run shows each
    round once, with the values metrics.jsonl holds (a round rerun after a kill replaces its
    first attempt instead of appearing twice). `users`: the names in the tags (else indices);
    above `per_user_limit` users no per-user tags (means, quantiles and the histogram only).
    A record with the round's per-user test perplexity gets its quantiles (`distribution`).
    `wandb` (experiment.tracking.options; with a path): the same scalars to Weights & Biases."""

    def __init__(self, path: str | None, tensorboard: bool = False, users=None,
                 per_user_limit: int = distribution.DEFAULT_LIMIT, wandb: dict | None = None):
        self.path = path
        self.per_user_limit = per_user_limit
        self._wandb_opts, self._wb = (wandb if path is not None else None), None
        self._memory: list[dict] = []
        self.users = list(users) if users is not None else None
        self.tensorboard_dir = os.path.join(os.path.dirname(path) or ".", "tensorboard") if (
            tensorboard and path is not None) else None
        self._tb = None

    def read(self) -> list[dict]:
        """The records; a last line cut short by a kill mid-append is dropped (that round is rerun)."""
        if self.path is None:
            return list(self._memory)
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                if i < len(lines) - 1 or line.endswith("\n"):
                    raise
        return out

    def truncate(self, round_index: int) -> None:
        keep = [r for r in self.read() if r["round"] <= round_index]
        if self.path is None:
            self._memory = keep
            return
        _atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        if self.tensorboard_dir is not None:
            self._rewrite_tensorboard(keep)
        if self._wandb_opts is not None and self._wb is None:
            self._start_wandb(keep)

    def write(self, record: dict) -> None:
        distribution.add_quantiles(record)
        if self.path is None:
            self._memory.append(json.loads(json.dumps(record)))  # as a file round trip gives it back
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard_dir is not None:
            if self._tb is None:  # written without a truncate first: start from what the file holds
                self._rewrite_tensorboard(self.read()[:-1])
            self._tensorboard_record(record)
        if self._wandb_opts is not None:
            if self._wb is None:
                self._start_wandb(self.read()[:-1])
            self._wandb_record(record)

    def _start_wandb(self, records: list[dict]) -> None:
        from comigs_jax.experiment.tracking import WandbLog
        self._wb = WandbLog(os.path.dirname(self.path) or ".", self._wandb_opts)
        weakref.finalize(self, self._wb.finish)  # the W&B run ends with its writer (or the process)
        if self._wb.fresh:  # a new W&B run: what metrics.jsonl already holds first
            for r in records:
                self._wandb_record(r)

    def finish(self, results: dict | None = None) -> None:
        """The end of the run: W&B gets the results' summary (mean test perplexity before and after
        aggregation, the final quantiles) and its run is finished (its files complete)."""
        if self._wb is not None:
            self._wb.finish(results)

    def _wandb_record(self, record: dict) -> None:
        ppl = record.get("test_ppl")
        self._wb.log(tensorboard_scalars(record, self.users, self.per_user_limit),
                     ppl if isinstance(ppl, list) else None, record["round"])

    def close(self) -> None:
        """Flush and close the TensorBoard file (also done when the writer is collected or at exit)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _rewrite_tensorboard(self, records: list[dict]) -> None:
        from comigs_jax.extras import require
        SummaryWriter = require("tensorboardX").SummaryWriter  # the `tensorboard` extra, only when asked for
        self.close()
        os.makedirs(self.tensorboard_dir, exist_ok=True)
        for name in os.listdir(self.tensorboard_dir):
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(self.tensorboard_dir, name))
        self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=10)
        weakref.finalize(self, self._tb.close)
        for r in records:
            self._tensorboard_record(r, flush=False)
        self._tb.flush()

    def _tensorboard_record(self, record: dict, flush: bool = True) -> None:
        for tag, value in tensorboard_scalars(record, self.users, self.per_user_limit):
            self._tb.add_scalar(tag, value, global_step=record["round"])
        if isinstance(record.get("test_ppl"), list):  # the population's spread, one histogram per evaluation
            self._tb.add_histogram("test_ppl/users", np.asarray(record["test_ppl"], np.float64),
                                   global_step=record["round"])
        if flush:
            self._tb.flush()


def _tag(name) -> str:
    return re.sub(r"[^\w.\-]", "_", str(name))


def tensorboard_scalars(record: dict, users=None, per_user_limit: int | None = None) -> list[tuple[str, float]]:
    """The TensorBoard scalars of one metrics.jsonl record, as (tag, value): the run-level numbers
    under their own key (`lr`, `tokens_per_s`, `seconds`), each per-user list as `<key>/<user>`
    (train_loss, train_ce, train_lb, router_val_ce, generalist_share, test_ppl, expert and router
    tokens/s, router_steps; a user without a value that round, e.g. no router phase, is skipped) and
    its mean over the users that have one as `<key>/mean_of_users`, and the routing shares per expert
    (averaged over layers) as `routing/<user>/expert<e>`. `users`: names for the tags (indices when
    None or when a list has another length, e.g. Centralized's one pooled model). The quantiles of
    per-user test perplexity as `test_ppl/p10`, `/p50`, `/p90`, `/worst10_mean`. A list longer than
    `per_user_limit` (None: no limit) gets no per-user tags, only its mean."""
    out = []
    for key, value in record.items():
        if key in ("round", "step", "includes_compile"):
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out.append((key, float(value)))
            continue
        if key == "test_ppl_quantiles" and isinstance(value, dict):
            out += [(f"test_ppl/{k}", float(v)) for k, v in value.items() if k != "n"]
            continue
        if not isinstance(value, list) or not value:
            continue
        per_user = per_user_limit is None or len(value) <= per_user_limit
        names = [_tag(u) for u in users] if users is not None and len(users) == len(value) else \
            [f"user{i}" for i in range(len(value))]
        if key == "routing":  # [U, L, E]
            for name, per_layer in zip(names if per_user else [], value):
                for e, share in enumerate(np.asarray(per_layer, np.float64).mean(0)):
                    out.append((f"routing/{name}/expert{e}", float(share)))
            continue
        seen = [float(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(seen) != sum(v is not None for v in value):
            continue  # not a per-user list of numbers
        for name, v in zip(names if per_user else [], value):
            if v is not None:
                out.append((f"{key}/{name}", float(v)))
        if seen:
            out.append((f"{key}/mean_of_users", float(np.mean(seen))))
    return out


def generalist_share(router_prob: np.ndarray, n_generalists: int) -> np.ndarray:
    """[..., L, E] mean router probabilities -> [...] probability mass on the generalist slots,
    averaged over layers (the paper's generalist routing share)."""
    return np.asarray(router_prob)[..., :n_generalists].sum(-1).mean(-1)


def round_record(round_index: int, m: dict, tc: TrainConfig, model_cfg, seconds: float, n_models: int,
                 active=None) -> dict:
    """One metrics.jsonl line from a round's per-user, per-step metrics ([U, S, ...]).

    tc is the engine's (Simulation.tc: Centralized's batch is batch x users). Speed: training
    tokens (batch x seq_len inputs per step) per second of the round's wall time, per user, with
    expert steps and router steps counted separately (both run in the same program, so they share
    the round's seconds; their sum is the user's total rate); users that sat the round out
    (`active` False) count 0. `tokens_per_s` is all users' expert tokens per second. The first
    round a process runs includes compilation (`includes_compile` is set by the caller)."""
    tokens = tc.batch_size * tc.seq_len
    act = np.ones(n_models) if active is None else np.asarray(active, np.float64)[:n_models]
    expert = act * m["ce"].shape[1] * tokens / seconds  # [U]
    rec = {
        "round": round_index,
        "step": round_index * tc.local_steps,
        "lr": float(optax.cosine_decay_schedule(tc.lr, tc.total_steps, alpha=tc.lr_final_ratio)(
            round_index * tc.local_steps - 1)),
        "train_loss": m["loss"].mean(1).tolist(),
        "train_ce": m["ce"].mean(1).tolist(),
        "train_lb": m["lb"].mean(1).tolist(),
        "seconds": seconds,
        "tokens_per_s": float(expert.sum()),
        "expert_tokens_per_s_per_user": expert.tolist(),
    }
    if "router_phase" in m:
        phases = m["router_phase"].sum(1) * act
        rec["router_steps"] = (phases * tc.router_steps).astype(int).tolist()
        rec["router_val_ce"] = [float(c.sum() / p) if p else None for c, p in zip(m["router_ce"], phases)]
        rec["router_tokens_per_s_per_user"] = (phases * tc.router_steps * tokens / seconds).tolist()
    if m.get("router_prob") is not None:
        probs = m["router_prob"].mean(1)  # [U, L, E]
        rec["routing"] = probs.tolist()
        rec["generalist_share"] = generalist_share(probs, model_cfg.moe.n_generalists).tolist()
    return rec


def speed_summary(records: list[dict]) -> dict:
    """Per-user training tokens/s over the run: tokens over seconds summed over the rounds that did
    not compile (all rounds if every one did), experts and router separately, from the
    metrics.jsonl records (router phases fall in some rounds only, so a per-round median would not do)."""
    steady = [r for r in records if not r.get("includes_compile")] or records
    seconds = float(sum(r["seconds"] for r in steady))
    out = {"rounds": len(steady), "seconds": seconds}
    if not steady or seconds <= 0:
        return out
    for key in ("expert_tokens_per_s_per_user", "router_tokens_per_s_per_user"):
        rows = [(np.asarray(r[key], np.float64), r["seconds"]) for r in steady if isinstance(r.get(key), list)]
        if rows:
            out[key] = (sum(v * sec for v, sec in rows) / seconds).tolist()
    out["tokens_per_s"] = float(sum(r["tokens_per_s"] * r["seconds"] for r in steady) / seconds)
    return out


def data_identity(data) -> dict:
    """What identifies the run's data: source, files and SHA-256 of the loaded arrays when known."""
    info = data.info
    out = {"source": info.get("source"), "users": list(data.users),
           "tokens": info.get("tokens") or [{"train": len(a), "valid": len(b), "test": len(c)}
                                             for a, b, c in zip(data.train, data.valid, data.test)]}
    for k in ("dir", "files", "file_dtype", "sha256", "cache_key"):
        if info.get(k) is not None:
            out[k] = info[k]
    return out


def results(cfg, method, seed: int, data, model_cfg, pre: dict, post: dict, records: list | None = None,
            zero_shot=None, communication: dict | None = None) -> dict:
    """results.json: per-user test perplexity of the local (pre-aggregation) models at the last
    round, after aggregation too, the Bayes floor when known, the base's zero-shot perplexity when
    given (`zero_shot`: per-user CE [U]), routing shares, the data's identity and (given the
    metrics records) per-user training speed, `communication`
    (comigs_jax.federated.communication.accounting) when given, and the provenance (versions, git
    commit, devices: comigs_jax.experiment.provenance)."""
    g = model_cfg.moe.n_generalists
    ppl, ppl_post = np.exp(pre["ce"]), np.exp(post["ce"])
    bayes = data.info.get("bayes_ppl_test")
    share, sel = generalist_share(pre["router_prob"], g), generalist_share(pre["selection"], g)
    users = []
    for i, name in enumerate(data.users):
        u = {"user": name, "test_ppl": float(ppl[i]), "test_ppl_post_aggregation": float(ppl_post[i]),
             "generalist_share": float(share[i]), "generalist_selection": float(sel[i])}
        if bayes is not None:
            u["bayes_ppl"] = float(bayes[i])
        if zero_shot is not None:
            u["zero_shot_ppl"] = float(np.exp(zero_shot[i]))
        users.append(u)
    out = {
        "method": method.name, "seed": seed, "router_mode": method.router_mode,
        "shared_roles": list(method.shared_roles), "faithful": bool(cfg.train.faithful),
        **({"shared_factors": list(method.shared_factors)} if tuple(method.shared_factors) != ("A", "B") else {}),
        **({"frozen": list(method.frozen)} if method.frozen else {}),
        **({"pcl": dataclasses.asdict(method.pcl)} if method.pcl is not None else {}),
        "eval": {"protocol": cfg.eval.protocol, "seq_len": cfg.train.seq_len, "batch_size": cfg.eval.batch_size,
                 **({} if cfg.eval.protocol == "full" else {"n_windows": cfg.eval.n_windows}),
                 **({"seed": seed} if cfg.eval.protocol == "reference" else {}),
                 **({"scored_tokens": np.asarray(pre["n_tokens"]).tolist()} if "n_tokens" in pre else {}),
                 "reported": "local models before the final aggregation (reference protocol, method.md §5)"},
        "data": data_identity(data),
        "users": users,
        "mean_test_ppl": float(ppl.mean()),
        "mean_test_ppl_post_aggregation": float(ppl_post.mean()),
        "routing_per_layer": np.asarray(pre["router_prob"]).tolist(),
    }
    if bayes is not None:
        out["mean_bayes_ppl"] = float(np.mean(bayes))
    if zero_shot is not None:
        out["mean_zero_shot_ppl"] = float(np.exp(zero_shot).mean())
    out["test_ppl_distribution"] = distribution.summary(
        users, records, cfg.output.get("per_user_limit", distribution.DEFAULT_LIMIT))
    if records:
        out["speed"] = speed_summary(records)
    if communication is not None:
        out["communication"] = communication
    out["provenance"] = provenance()
    return out


def results_markdown(res: dict) -> str:
    bayes = "bayes_ppl" in res["users"][0]
    zero = "zero_shot_ppl" in res["users"][0]
    head = ("| user | test ppl | after aggregation |" + (" Bayes-optimal ppl |" if bayes else "")
            + (" base zero-shot ppl |" if zero else "") + " generalist share |")
    lines = [f"### {res['method']} (seed {res['seed']}, router {res['router_mode']}, "
             f"faithful={res['faithful']}, eval {res['eval']['protocol']})", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    dist = res.get("test_ppl_distribution")
    shown = dist is None or distribution.per_user_shown(len(res["users"]), dist["per_user_limit"])
    for u in res["users"] if shown else []:
        lines.append(f"| {u['user']} | {u['test_ppl']:.3f} | {u['test_ppl_post_aggregation']:.3f} |"
                     + (f" {u['bayes_ppl']:.3f} |" if bayes else "")
                     + (f" {u['zero_shot_ppl']:.3f} |" if zero else "") + f" {u['generalist_share']:.3f} |")
    lines.append(f"| **mean** | **{res['mean_test_ppl']:.3f}** | {res['mean_test_ppl_post_aggregation']:.3f} |"
                 + (f" {res['mean_bayes_ppl']:.3f} |" if bayes else "")
                 + (f" {res['mean_zero_shot_ppl']:.3f} |" if zero else "") + " |")
    if not shown:
        lines.append(f"| ({len(res['users'])} users: above output.per_user_limit={dist['per_user_limit']}, "
                     "every user's row is in users.csv and results.json) |" + " |" * (head.count("|") - 2))
    if dist is not None:
        lines += ["", *distribution.markdown(dist)]
    comm = res.get("communication")
    if comm and comm.get("per_round_params") is not None:
        p = comm["per_round_params"]
        span = f"{min(p):,}" if min(p) == max(p) else f"{min(p):,}-{max(p):,}"
        up = max(comm["upload_bytes_float32"]) / 2**20
        lines += ["", f"Communication per user per aggregation round: {span} parameters each way; the run's "
                      f"largest upload {up:,.2f} MiB in float32 ({up / 2:,.2f} MiB in bfloat16)."]
    if res.get("privacy"):
        p = res["privacy"]
        lines += ["", f"User-level DP of the shared leaves: epsilon {p['epsilon']:.3g} at delta {p['delta']:g} after "
                      f"{p['rounds']} rounds (sigma {p['noise_multiplier']:.4g}, clip {p['clip']:g}, {p['sampling']} "
                      f"sampling q={p['q']:g}); {p['local']}."]
    return "\n".join(lines)


def write_results(run_dir: str, res: dict) -> None:
    _atomic_write(os.path.join(run_dir, "results.json"), json.dumps(res, indent=1))
    _atomic_write(os.path.join(run_dir, "users.csv"), distribution.users_csv(res["users"]))
    _atomic_write(os.path.join(run_dir, "results.md"), results_markdown(res) + "\n")


STUDY_HINT = ("python -m experiments.study --config=configs/studies/where_comigs_wins.py (5 seeds, methods "
              "paired by seed, 95 % intervals; docs/studies.md)")


def comparison(all_results: list[dict]) -> dict:
    """Method x user test perplexity over seeds, as a study's cell reports it
    (study_report.method_row: per user and for the mean over users n_seeds, mean, std (ddof 1),
    ci95), and the methods compared paired by seed on their common seeds (`comparison`, None with
    one method or fewer than 2 common seeds: a comparison needs an interval)."""
    users = [u["user"] for u in all_results[0]["users"]]
    runs = {(r["method"], r["seed"]): r for r in all_results}
    seeds = {}
    for r in all_results:
        seeds.setdefault(r["method"], []).append(r["seed"])
    table = {"users": users, "statistics": study_report.STATISTICS,
             "methods": {m: study_report.method_row(runs, m, s) for m, s in seeds.items()}}
    comp = study_report.compare(table["methods"])
    table["comparison"] = comp if comp is not None and len(comp["seeds"]) >= 2 else None
    if "bayes_ppl" in all_results[0]["users"][0]:
        table["bayes_ppl"] = [u["bayes_ppl"] for u in all_results[0]["users"]]
    zero = [r for r in all_results if "zero_shot_ppl" in r["users"][0]]
    if zero:  # the same base on the same test windows in every run
        table["zero_shot_ppl"] = [u["zero_shot_ppl"] for u in zero[0]["users"]]
    return table


def _pm(mean: float, std, ci) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def comparison_markdown(table: dict) -> str:
    """The comparison as markdown: per method and user the mean over seeds ± the sample std [95 %
    interval]; with several methods and >= 2 common seeds the paired findings
    (statistics.sentence), else a line saying the table states no difference and naming the study
    command that does."""
    users, rows = table["users"], table["methods"]
    n = sorted({r["n_seeds"] for r in rows.values()})
    spread = "mean ± sample std (ddof 1) [95 % t interval] over seeds" if n[-1] > 1 else "one seed"
    lines = [f"### Test perplexity ({spread}; local models before the final aggregation)", "",
             "| method | " + " | ".join(users) + " | mean |", "|" + "---|" * (len(users) + 2)]
    for name, e in rows.items():
        cells = [_pm(m, s, c) for m, s, c in zip(e["mean"], e["std"], e["ci95"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{_pm(e['user_mean'], e['user_mean_std'], e['user_mean_ci95'])}** |")
    if "zero_shot_ppl" in table:
        lines.append("| base, zero-shot | " + " | ".join(f"{z:.3f}" for z in table["zero_shot_ppl"])
                     + f" | {np.mean(table['zero_shot_ppl']):.3f} |")
    if "bayes_ppl" in table:
        lines.append("| Bayes-optimal | " + " | ".join(f"{b:.3f}" for b in table["bayes_ppl"])
                     + f" | {np.mean(table['bayes_ppl']):.3f} |")
    comp = table.get("comparison")
    if comp is not None:
        lines += ["", f"Paired by seed ({len(comp['seeds'])} seeds), the mean over users: "
                      + (f"{comp['winner']} wins." if comp["winner"] else "tie: " + ", ".join(comp["tied"]) + ".")]
        lines += [f"- {statistics.sentence(p)}" for p in comp["pairs"]]
    elif len(rows) > 1:
        lines += ["", f"{'One seed' if n[0] < 2 else 'No common seeds'}: no interval, so this table states no "
                      f"difference between the methods. Whether a difference is real: {STUDY_HINT}."]
    return "\n".join(lines)


def write_comparison(workdir: str, table: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    _atomic_write(os.path.join(workdir, "comparison.json"), json.dumps(table, indent=1))
    _atomic_write(os.path.join(workdir, "comparison.md"), comparison_markdown(table) + "\n")
