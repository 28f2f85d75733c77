"""Weights & Biases, optional: `output.wandb=True` logs what TensorBoard gets (metrics.jsonl's
numbers as `tensorboard_scalars`, step = round, and the users' test-perplexity histogram), with the
resolved config and the provenance as the W&B run's config. Needs the `wandb` extra (one line
naming it when missing, before any work: comigs_jax.extras). No account is needed with
WANDB_MODE=offline: the run is written under <run>/wandb/offline-run-*/ (`wandb sync` uploads it
later). Only process 0 logs (MetricsWriter has a path there only).

A run's W&B id is kept in <run>/wandb_id, so a resumed run continues the same W&B run (resume
"allow"): W&B keeps the rounds it already has (a round rerun after a kill is logged once, W&B
ignoring a step it has); a new W&B run (first start, or the id file gone) gets metrics.jsonl's
kept records first."""
from __future__ import annotations

import os

ID_FILE = "wandb_id"


def options(cfg, run_dir: str) -> dict | None:
    """The W&B settings of one run (None when output.wandb is off): what MetricsWriter starts."""
    out = cfg.get("output")
    if out is None or not out.get("wandb", False):
        return None
    from comigs_jax.experiment.provenance import provenance
    name = os.path.basename(os.path.abspath(run_dir))
    return {"project": out.get("wandb_project", "comigs_jax") or "comigs_jax", "name": name,
            "group": os.path.basename(os.path.dirname(os.path.abspath(run_dir))),
            "config": {**cfg.to_dict(), "provenance": provenance()}}


class WandbLog:
    """One W&B run for one run folder; `log(scalars, histogram, step)`, `finish()`."""

    def __init__(self, run_dir: str, opts: dict):
        from comigs_jax.extras import require
        self.wandb = require("wandb")
        path = os.path.join(run_dir, ID_FILE)
        run_id = open(path).read().strip() if os.path.exists(path) else None
        self.fresh = run_id is None
        settings = self.wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                       x_disable_stats=True, x_disable_machine_info=True)
        self.run = self.wandb.init(project=opts["project"], name=opts["name"], group=opts["group"],
                                   config=opts["config"], dir=run_dir, id=run_id,
                                   resume="allow" if run_id else None, reinit="create_new", settings=settings)
        if self.fresh:
            with open(path + ".tmp", "w") as f:
                f.write(self.run.id)
            os.replace(path + ".tmp", path)

    def log(self, scalars: list[tuple[str, float]], histogram, step: int) -> None:
        row = dict(scalars)
        if histogram is not None:
            row["test_ppl/users"] = self.wandb.Histogram(histogram)
        self.run.log(row, step=int(step))

    def finish(self, results: dict | None = None) -> None:
        """End the W&B run (once); with `results` (results.json), its summary first."""
        if self.run is None:
            return
        if results is not None:
            summary = {k: results[k] for k in ("mean_test_ppl", "mean_test_ppl_post_aggregation") if k in results}
            final = results.get("test_ppl_distribution", {}).get("final", {})
            summary.update({f"final_test_ppl/{k}": v for k, v in final.items() if k != "n"})
            self.run.summary.update(summary)
        self.run.finish()
        self.run = None
