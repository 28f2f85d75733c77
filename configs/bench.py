"""The benchmark: vmap versus loop, many users, efficiency against the machine's own peak.

    python -m experiments.bench                                    # this file's defaults
    python -m experiments.bench --config.users=1,4,16,64,256       # the tiny sweep
    python -m experiments.bench --config.models=gpt2 --config.gpt2.users=1,2

Lists are comma-separated strings (so that `--config.users=64` and `--config.users=1,4` both
parse). The defaults run on a 2-core CPU in under 10 minutes; `get_config("gpu")` is the
accelerator preset (`--config=configs/bench.py:gpu`): GPT-2 124M in bfloat16 up to the
largest U that fits.

Several processes: run the same command on every host, or on one machine
`python -m experiments.launch_local --processes 2 --module experiments.bench -- --config.models=tiny`.
"""
from ml_collections import ConfigDict

from configs import base

MODES = "loop_step,loop_round,vmap,vmap_sharded"


def get_config(preset: str = "cpu") -> ConfigDict:
    c = ConfigDict()
    c.models = "tiny,gpt2"          # which model sizes to run, in order
    c.users = "1,4,16,64,256"       # U for the tiny sweep
    c.modes = MODES                 # any subset, in any order
    c.method = "comigs"             # a method of comigs_jax.federated.methods
    c.dtype = ""                    # activation dtype; "" = float32 on CPU, bfloat16 on GPU/TPU
    c.seed = 0
    c.warmup = 0                    # untimed rounds after the first (compiling, untimed) round
    c.repeats = 5                   # timed rounds per mode (the median is reported) ...
    c.min_repeats = 2               # ... at least this many ...
    c.max_seconds = 10.0            # ... and no more once the timed rounds exceed this many seconds
    c.loop_max_users = 64           # skip loop modes above this U (0: never skip): their tokens/s do
                                    # not grow with U, and at U=256 they add ~2 min on 2 cores
    c.matmul_size = 0               # n of the n x n x n peak matmul; 0 = 4096 CPU, 8192 accelerators
    c.out_dir = "runs/bench"        # bench.json and bench.md land here
    c.loss_atol = 1e-4              # modes must agree on first-round losses to this tolerance
    # Several JAX processes (pod hosts; experiments/launch_local.py): experiments.run's block and
    # defaults. With more than one process only vmap_sharded runs, over every process's devices.
    c.distributed = base.get_config().distributed

    # Tiny config for the many-users sweep: 2 layers, width 128, vocabulary 2048, sequence 128.
    c.tiny = ConfigDict(dict(
        vocab_size=2048, n_embd=128, n_layer=2, n_head=4, seq_len=128, batch_size=2,
        rank=8, n_experts=2, n_generalists=1, top_k=2,
        local_steps=2, router_every=2, router_steps=1, train_tokens=8192, valid_tokens=4096))
    # GPT-2 124M, 1 generalist + 1 specialist, rank 8 (attention LoRA rank 8 too).
    c.gpt2 = ConfigDict(dict(
        users="2",
        vocab_size=50257, n_embd=768, n_layer=12, n_head=12, seq_len=128, batch_size=4,
        rank=8, n_experts=2, n_generalists=1, top_k=2,
        local_steps=2, router_every=2, router_steps=1, train_tokens=8192, valid_tokens=4096))

    if preset == "gpu":
        c.models = "gpt2"
        c.modes = "loop_step,loop_round,vmap"
        c.gpt2.users = "1,8,64,128,192"
        c.gpt2.batch_size = 8
        c.gpt2.local_steps = 4
        c.gpt2.router_every = 4
        c.min_repeats = 3
        c.loop_max_users = 8
    elif preset != "cpu":
        raise ValueError(f"preset={preset!r}: allowed 'cpu', 'gpu'")
    return c
