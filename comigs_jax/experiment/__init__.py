"""The experiment loop as a library: `run(config, workdir) -> {(method, seed): results}`.

    from comigs_jax import experiment
    from configs import demo
    results = experiment.run(demo.get_config(), "runs/demo")
    per_cell = experiment.run_cells([(cfg_a, "runs/a"), (cfg_b, "runs/b")])  # configs that differ
    # only in seeds / lr / router_lr / lb_weight / weight_decay / prune_lambda / prox_mu / server.lr: one program per method

Layers below it (model, data, federated, train) know nothing of it; experiments/ only parses
flags and calls it (docs/architecture.md).
"""
from comigs_jax.experiment.loop import run, run_cells, train_and_evaluate  # noqa: F401
