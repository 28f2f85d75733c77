"""The experiment loop as a library: `run(config, workdir) -> {(method, seed): results}`.

    from comigs_jax import experiment
    from configs import demo
    results = experiment.run(demo.get_config(), "runs/demo")

Layers below it (model, data, federated, train) know nothing of it; experiments/ only parses
flags and calls it (docs/architecture.md).
"""
from comigs_jax.experiment.loop import run, train_and_evaluate  # noqa: F401
