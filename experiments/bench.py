r"""vmap versus loop: what simulating users as an array axis buys, against the machine's own peak.

    python -m experiments.bench [--config=configs/bench.py[:gpu]] [--config.users=1,4,16,64,256] ...

The command line is experiments.run's (comigs_jax.cli: `--config=FILE[:ARG]`, `--config.key=value`,
an unknown key or a bad value is one `error: ...` line and exit code 1); `main(argv)` returns the
exit code, so tests call it in-process. Each workload's engine configs are built from the keys
experiments.run and comigs_jax.capacity share (`base`, `vocab_size`, the `model` and `train`
groups) by the same function, comigs_jax.configuration.engine_configs.

For each model size and user count U, in one process, four ways to run the same federated round
(comigs_jax.train.rounds; all start from the same states and must give the same losses):

- loop_step:    Python loop over users, one jitted per-user training step per call (the reference)
- loop_round:   Python loop over users, one jitted per-user round (lax.scan over local steps)
- vmap:         all users in one jitted round (jit(vmap(scan)))
- vmap_sharded: the same with users split over a `users` mesh axis over the devices

Measured per mode: compile time (the vmapped modes: lowering + XLA compilation, timed ahead of the
first round; the loops: first round minus the steady-state round), steady-state wall
time per round (median of repeated rounds after warm-up, block_until_ready), training tokens/s
over all users, speedups, peak host RSS while the mode ran, device memory where the backend
reports it, and achieved FLOP/s as a fraction of the peak of a large matmul of the same dtype
timed in the same run.

FLOP convention: the capacity model's (comigs_jax.capacity.round_flops, one count for the
project): a [m, k] x [k, n] matmul is 2mkn FLOPs; forward matmuls, the input gradients on the
path to a trainable leaf and the trainable leaves' weight gradients, per user, times the expert
and router steps of a round, times U; elementwise ops, softmax, LayerNorm and the optimizer are
not counted.

The vmapped modes place their inputs through a Layout (comigs_jax.federated.layout: its `users`
and `replicated` shardings, and `chunk`), the one the training loop uses, and run
vmap_round(..., user_chunk=layout.model_chunk): `--config.user_chunk=C` runs each device's users
C at a time (0 = all at once). A chunk that does not divide a device's users pads them to whole
chunks: padding rows (copies of user 0, inactive) are computed but never reported nor counted as
work (tokens/s and FLOPs are the real users'). `--config.remat` is every workload's model.remat.

Sweep (`--config.sweep=True`): per model, U doubles from its first listed U; before a U starts, its
bytes are predicted (the larger of comigs_jax.capacity.device_bytes for the mode's layout, plus on
CPU the process's resident set at the start, and the extrapolated peak measured at the previous
U's) and the sweep stops if they exceed sweep_fraction of RAM (CPU) or of the device's memory;
it also stops at a U that runs out of memory or passes sweep_max_users. It reports the largest U
that completed a round, with its round time.

On CPU this module asks XLA for 8 fake host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set before jax is imported, unless XLA_FLAGS already sets a count) so that vmap_sharded has a
mesh to shard over; the flag only affects the CPU platform. The fake devices share the same cores.

Several processes (the hosts of a pod; `experiments.launch_local` on one machine): the module
calls jax.distributed.initialize() at start-up (cfg.distributed, as experiments.run) and then runs
only vmap_sharded, over the global mesh of every process's devices; the other modes are
single-device baselines and are skipped. A U that does not divide the global device count is
skipped. Every process builds the same synthetic workload from the seed; process 0 alone prints
and writes the results. The % of peak is then against the sum of the processes' measured peaks
(CPU) or one device's peak x the devices (accelerators); the output says which.

Checkpoints (`--config.checkpoints=none,sync,async`): instead of the modes, each model's vmapped
round at each U followed by a checkpoint of every user's state, saved each way
(comigs_jax.capacity.checkpoint_timing: median round time, the save's blocking part, the last
save's wait, the ratio to `sync`); {out_dir}/bench_checkpoints.json and .md.

Writes {out_dir}/bench.json and {out_dir}/bench.md (the table) and prints the table. The workload,
timing, sweep and report code is comigs_jax.capacity's (workload.py, timing.py, sweep.py,
report.py, benchmark.py); this module is the command line.
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import sys
import time

import jax
from absl import logging
from ml_collections import ConfigDict

from comigs_jax import cli, compilation_cache, distributed
from comigs_jax.capacity.benchmark import check_config, run_benchmark
from comigs_jax.capacity.checkpoint_timing import run_checkpoint_bench
from comigs_jax.capacity.timing import _print
from configs.bench import WORKLOADS

DEFAULT_CONFIG = os.path.join(cli.ROOT, "configs", "bench.py")
# Where the keys of configs/bench.py's groups are defined (unknown-key messages): the workloads'
# model and train groups are configs/base.py's, without model.dtype (the bench's `dtype`).
HOMES = {"": "configs/bench.py", "distributed": "configs/base.py"}


def main(argv=None) -> int:
    """The command line `python -m experiments.bench [--config=FILE[:ARG]] [--config.key=value ...]`
    (argv[0] is the program); its exit code. Errors are one `error: ...` line on stderr."""
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg, _ = cli.parse_config(argv, DEFAULT_CONFIG, homes=HOMES, doc=__doc__)
        check_config(cfg, WORKLOADS)  # before the distributed start-up and any JAX work
        compilation_cache.configure(cfg)  # before the first compile
        logging.set_verbosity(logging.WARNING)  # INFO on process 0 once it is known (bench_main)
        multi = distributed.initialize(cfg.distributed)  # before any JAX computation; no-op for one process
        return distributed.run_or_exit(lambda: cli.as_exit(lambda: bench_main(cfg, argv)), multi)

    return cli.main_guard(body)


def bench_main(cfg: ConfigDict, argv=None) -> None:
    # the other processes of a multi-process run print nothing but errors
    logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    t = time.perf_counter()
    if cfg.checkpoints:  # the checkpoint bench instead of the modes' (comigs_jax.capacity.checkpoint_timing)
        logging.set_verbosity(logging.WARNING)  # orbax reports every step of every save at INFO
        result = run_checkpoint_bench(cfg, argv)
        _print(result["markdown"])
        _print(f"total {time.perf_counter() - t:.0f} s; wrote {os.path.join(cfg.out_dir, 'bench_checkpoints.json')}")
        return
    result = run_benchmark(cfg, WORKLOADS, argv)
    _print(result["markdown"])
    _print(f"total {time.perf_counter() - t:.0f} s; wrote {os.path.join(cfg.out_dir, 'bench.json')}")


def console() -> int:
    """The console script `comigs-bench` (setup.cfg): `main` in its own process."""
    cli.install_process_hooks()
    return main()


if __name__ == "__main__":
    sys.exit(console())
