r"""A capacity model: bytes per user, FLOPs per round, users per device, devices for U users.

    python -m comigs_jax.capacity                                  # configs/capacity.py: 1,000 users of GPT-2 124M
    python -m comigs_jax.capacity --config.users=5000 --config.train.batch_size=16
    python -m comigs_jax.capacity --config=configs/capacity.py:tiny --config.measure=16,64
    python -m comigs_jax.capacity --config.train.user_chunk=8 --config.model.remat=block --config.train.batch_size=8
    python -m comigs_jax.capacity --config=configs/slimpajama.py                # any experiment config: its run
    python -m comigs_jax.capacity --config.server.optimizer=adam --config.train.user_chunk=8   # FedAdam's server state

Everything here is arithmetic on the config's shapes (no tracing, no device): `plan(model_cfg, tc,
method, n_users)` returns a dict; `format_plan` renders it as markdown. The command line takes
`--config=FILE[:ARG]` and `--config.key=value` as experiments.run does (configs/capacity.py: the
`model` and `train` groups are configs/base.py's; or any experiment config, whose runs it plans:
`command.experiment_plans`), and builds the engine's configs through the same functions
(comigs_jax.configuration.engine_configs) as experiments.bench, whose FLOPs per round are
`round_flops` here. docs/scaling.md explains the numbers and checks them against the compiled
program (tests/test_capacity.py).

Modules: `sizes` (a config's matmul and parameter shapes, parameters by role, one user's state),
`server_state` (the server's state per row),
`memory` (kept activations, the backward's transient, one step's working set, shared bytes),
`flops` (FLOPs per step and round), `planning` (targets, users per device, the plan and its
markdown), `measurement` (the compiled program's memory beside the model's), `command` (the command
line); and the benchmark's library, whose command is experiments.bench: `workload` (a model size
at one U and each mode's program), `timing` (the machine's peak, one mode's times, a workload's
modes), `sweep` (U doubled until memory is full), `report` (table, targets), `benchmark` (checks,
the whole run, bench.json / bench.md).

Memory of one user (the leading user axis of everything the round program holds per user):

- state: trainable params (float32, by role), the expert AdamW state (mu, nu: float32 per
  parameter it updates, plus two int32 counters: Adam's and the cosine schedule's), the router
  AdamW state (alternating methods), the step counter and PRNG key, faithful mode's leak buffers,
  and the server's state per row (below);
- tokens: the user's token arrays on device (train + validation, padded to the longest user);
- step: the working set of one training step, the largest of the round (expert step): the
  activations that the backward pass keeps (`activation_tensors`, in one of two profiles:
  "accelerator", what XLA's GPU backend keeps after fusion, used for the targets; "cpu", what
  XLA's CPU backend keeps), plus the backward's largest transient (`transient_tensors`: a
  vocabulary block of the head's logits, or one recomputed layer), the gradients and the
  sampled windows. `model.remat` (cfg.remat) changes what is kept (accelerator profile).

A device holds (U / devices) x (state + tokens) of its users, padding rows included, plus the
shared bytes, plus the step working set of the users whose activations are alive at once: C of
them with train.user_chunk = C (`device_bytes`, `users_per_device`), all of them without.

`measure` compiles the real round program (compile only, with the same user_chunk at every U) and
compares its memory_analysis() with the model; `python -m comigs_jax.capacity ...
--config.measure=16,64` prints both.

Shared (replicated on every device, not per user): the frozen base in float32, its copy in the
activation dtype (XLA converts each frozen kernel once per step and keeps it for the backward),
and the transposed embedding of the tied LM head.

The server's state per row (`server_state.server_bytes`, the plan's "server" by part and the
state's "server" entry; 0 for a mean without server optimizer or DP): a server optimizer's server
value (the shared leaves; FlexLoRA's in product space, dW [d_in, d_out] per shared LoRA module)
and its optax moments (sgd with momentum 1 copy, adam / yogi / adagrad 2) and lr, DP's round-start
copy of the shared leaves (alive on device during the round), the per-row ranks, HetLoRA's tails
and FlexLoRA's scales. `server.*` and `dp.enabled` are configs/base.py's keys. Not counted: the
server program's transients after the round (the aggregation, FlexLoRA's SVDs).

FLOP convention: a matmul [m, k] x [k, n] is 2mkn FLOPs; elementwise ops, softmax, LayerNorm and
the optimizer are not counted. Forward: every matmul. Backward: the
input gradient of every matmul that lies between a trainable leaf and the loss (frozen matmuls
included: that is how the gradient reaches the adapters below them), and weight gradients of
the trainable leaves only (none for frozen kernels). For a frozen model with LoRA adapters the
training step is therefore about 2x its forward, not the 3x of full fine-tuning.
"""
from __future__ import annotations

from comigs_jax.capacity.command import DEFAULT_CONFIG, HOMES, check_config, experiment_plans, main, run, run_any
from comigs_jax.capacity.flops import round_flops, step_flops
from comigs_jax.capacity.measurement import compiled_memory, engine_server_bytes, format_measurement, measure
from comigs_jax.capacity.memory import (PROFILES, activation_tensors, head_block_of, shared_bytes, step_bytes,
                                        transient_tensors)
from comigs_jax.capacity.planning import (MFU, TARGETS, USABLE_FRACTION, MiB, Target, device_bytes, device_rows,
                                          format_plan, plan, users_per_device)
from comigs_jax.capacity.server_state import server_bytes, shared_elements
from comigs_jax.capacity.sizes import GiB, Shapes, param_counts, shapes, state_bytes
from comigs_jax.model.footprint import CPU_GELU_TERMS, CPU_SWIGLU_TERMS

__all__ = [
    "DEFAULT_CONFIG", "HOMES", "check_config", "experiment_plans", "main", "run", "run_any", "round_flops",
    "step_flops", "compiled_memory", "format_measurement", "measure", "CPU_GELU_TERMS", "CPU_SWIGLU_TERMS",
    "PROFILES", "activation_tensors", "head_block_of", "shared_bytes", "step_bytes", "transient_tensors",
    "MFU", "TARGETS", "USABLE_FRACTION", "MiB", "Target", "device_bytes", "device_rows", "format_plan",
    "plan", "users_per_device", "GiB", "Shapes", "param_counts", "shapes", "state_bytes", "server_bytes",
    "shared_elements", "engine_server_bytes",
]
