"""A program's outputs: each run's results (results.json / .md), figures, its zero-shot
evaluation and its communication count, written as the run alone writes them."""
from __future__ import annotations

import json
import os

import numpy as np

from comigs_jax import configuration, distributed
from comigs_jax.errors import WorkdirError
from comigs_jax.experiment import metrics
from comigs_jax.experiment.log import log
from comigs_jax.experiment.program import Program, decode_eval, evaluate, pick
from comigs_jax.federated import accounting


def zero_shot(prog: Program, start: int) -> list:
    """Each run's per-user test CE of the base alone (eval.zero_shot; None without it): evaluated
    before round 1 (every adapter's B is 0, so the model is the frozen base, whatever the method) and
    kept in its run_dir/zero_shot.json, read back from there when the run resumes."""
    if not prog.cfg.eval.get("zero_shot"):
        return [None] * len(prog.runs)
    ev0 = evaluate(prog) if start == 0 else None
    return [_zero_shot(r.run_dir, pick(ev0, f) if ev0 is not None else None) for f, r in enumerate(prog.runs)]


def _zero_shot(run_dir: str, ev: dict | None) -> np.ndarray | None:
    path = os.path.join(run_dir, "zero_shot.json")
    if ev is None:
        try:
            with open(path) as f:
                return np.asarray(json.load(f)["ce"], np.float64)
        except (OSError, ValueError, KeyError):
            return None  # started before eval.zero_shot was set: nothing to recover without the base state
    ce = np.asarray(ev["ce"], np.float64)
    if distributed.is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"ce": ce.tolist()}, f)
        os.replace(tmp, path)
    return ce


def communication(cfg, sim, records: list, n_models: int) -> dict:
    """results.json's `communication` of one run from its metrics records, counted by its server:
    the rounds each user trained (and so uploaded), the configured ranks (model.ranks) and, when the
    run logged them (`expert_ranks`, a ranked run), each round's ranks and who uploaded."""
    taken = [sum(1 for r in records if r["expert_tokens_per_s_per_user"][u] > 0) for u in range(n_models)]
    ranks = configuration.ranks_of(cfg)
    kw = {"ranks": ranks[:n_models] if ranks is not None and len(ranks) >= n_models else None}
    if records and all("expert_ranks" in r for r in records):
        per_module = all("expert_module_ranks" in r for r in records)  # [U, M] per round: counted per module
        kw["round_ranks"] = [r["expert_module_ranks" if per_module else "expert_ranks"] for r in records]
        kw["round_taken"] = [[x > 0 for x in r["expert_tokens_per_s_per_user"][:n_models]] for r in records]
    return sim.server.communication(sim.model_cfg, sim.method, sim.expert_counts[:n_models], sim.tc.rounds, taken,
                                    **kw)


def read_results(run, meta: dict) -> tuple[dict | None, dict | None]:
    """(results.json, None) of a finished run; killed before results.json was written: (None, the
    pre-aggregation evaluation saved with its last checkpoint), to write its outputs from."""
    try:
        with open(os.path.join(run.run_dir, "results.json")) as f:
            return json.load(f), None
    except (OSError, ValueError):
        if "pre_eval" not in meta:
            raise WorkdirError(f"{run.run_dir} holds a finished run without results.json whose last checkpoint "
                               "predates the saved evaluation; rerun with --config.resume=False") from None
        return None, decode_eval(meta["pre_eval"])


def write_outputs(prog: Program, pre_eval: dict | None, metas: list[dict], zero_shots: list) -> list[dict]:
    """Each run's results (and figures, results.json last: it marks a complete run). pre_eval None:
    the runs had finished before this call; their results.json, or their outputs written from the
    evaluation saved with their last checkpoint (which is post-aggregation)."""
    n = len(prog.runs)
    written, pres = [None] * n, [None] * n
    if pre_eval is None:
        kept = [read_results(run, meta) for run, meta in zip(prog.runs, metas)]
        written, pres = [res for res, _ in kept], [ev for _, ev in kept]
        if all(res is not None for res in written):
            return written
        log(f"[{prog.name}] the run had finished; writing its outputs")
    else:
        pres = [pick(pre_eval, f) for f in range(n)]
    one_round = prog.method.one_round  # no aggregation: the evaluation after it is the one before
    post_eval = evaluate(prog) if not one_round else None
    return [written[f] if written[f] is not None else
            _write_run(prog, f, pres[f], pres[f] if one_round else pick(post_eval, f), zero_shots[f])
            for f in range(n)]


def _write_run(prog: Program, f: int, pre: dict, post: dict, zero_shot_ce) -> dict:
    run, cfg = prog.runs[f], prog.cfg
    records = prog.writers[f].read()
    comm = communication(run.cfg, prog.sim, records, prog.n_models)
    results = metrics.results(run.cfg, prog.sim.method, run.seed, prog.data, prog.model_cfg, pre, post,
                              records=records, zero_shot=zero_shot_ce, communication=comm)
    if prog.sim.setup.dp is not None:  # epsilon after every round the run made; local leaves cost nothing
        results["privacy"] = accounting.report(prog.sim.setup.dp, len(records), prog.sim.method)
    if cfg.output.figures:
        from comigs_jax.experiment import plot  # matplotlib only when figures are drawn
        plot.run_figures(run.run_dir, results, records, prog.sim, prog.data, cfg.output.routing_tokens,
                         write=distributed.is_main_process(), federation=f)
    if distributed.is_main_process():
        metrics.write_results(run.run_dir, results)  # last: results.json marks a complete run
    prog.writers[f].finish(results)  # W&B (output.wandb): the run's summary, and its files complete
    return results
