"""The benchmark: vmap versus loop, many users, efficiency against the machine's own peak.

    python -m experiments.bench                                    # this file's defaults
    python -m experiments.bench --config.users=1,4,16,64,256       # the tiny sweep
    python -m experiments.bench --config.models=gpt2 --config.gpt2.users=1,2
    python -m experiments.bench --config.tiny.train.batch_size=8 --config.tiny.model.rank=16
    python -m experiments.bench --config.models=tiny --config.modes=vmap --config.user_chunk=64 \
        --config.users=64 --config.sweep=True      # doubles U until 90% of RAM would be full

Lists are comma-separated strings (so that `--config.users=64` and `--config.users=1,4` both
parse). Each workload (`tiny`, `mini`, `gpt2`, `smollm2`) says what model runs in the keys that
comigs_jax.capacity (configs/capacity.py) and experiments.run use: `base` (a GPT-2 size, a Llama size
such as "smollm2-135m", or "pretrain": the small base of `pretrain.n_layer / n_embd / n_head`),
`vocab_size` (0: the named base's own), and configs/base.py's `model` and
`train` groups (their `model.dtype`, `model.remat` and `train.user_chunk` are left out: the
bench's `dtype`, `remat` and `user_chunk` are every workload's; `dtype` is the peak matmul's too). The defaults run on a 2-core CPU in under 10 minutes; `get_config("gpu")` is the
accelerator preset (`--config=configs/bench.py:gpu`): GPT-2 124M in bfloat16 up to the largest U
that fits.

Several processes: run the same command on every host, or on one machine
`python -m experiments.launch_local --processes 2 --module experiments.bench -- --config.models=tiny`.
"""
from ml_collections import ConfigDict

from configs import base
from configs.capacity import shape_groups

MODES = "loop_step,loop_round,vmap,vmap_sharded"
WORKLOADS = ("tiny", "mini", "gpt2", "smollm2")  # the model sizes `models` may list; each is a group of this config


def workload(base_name: str, vocab_size: int, **train) -> ConfigDict:
    """One workload: the shared model keys (configs/capacity.py's shape_groups) and its tokens."""
    w = shape_groups(ConfigDict(), base_name=base_name, vocab_size=vocab_size)
    del w.model.dtype  # the bench's `dtype`
    del w.model.remat  # the bench's `remat`
    del w.train.user_chunk  # the bench's `user_chunk`
    if base_name != "pretrain":
        del w.pretrain
    for key, value in train.items():
        w.train[key] = value
    w.train_tokens = 8192  # training tokens per user (uniform random)
    w.valid_tokens = 4096  # validation tokens per user (the router steps')
    return w


def get_config(preset: str = "cpu") -> ConfigDict:
    c = ConfigDict()
    c.models = "tiny,gpt2"          # which model sizes to run, in order
    c.users = "1,4,16,64,256"       # U for the tiny sweep
    c.modes = MODES                 # any subset, in any order
    c.method = "comigs"             # a method of comigs_jax.federated.methods
    c.dtype = ""                    # activation dtype of every workload and of the peak matmul;
                                    # "" = float32 on CPU, bfloat16 on GPU/TPU; float64 (with
                                    # JAX_ENABLE_X64=1) for checking that the modes agree
    c.user_chunk = 0                # train.user_chunk of the vmapped modes, every workload: each device runs
                                    # its users this many at a time (0 = all at once; a chunk that does not
                                    # divide a device's users pads them, masked and not counted as work)
    c.remat = "none"                # model.remat of every workload: none | block | moe
    c.sweep = False                 # True: per model, double U from its first listed U until the next U
                                    # would not fit (capacity model / measured bytes vs sweep_fraction)
    c.sweep_fraction = 0.9          # memory the sweep may fill: of RAM on CPU, of the device on accelerators
    c.sweep_max_users = 0           # the sweep stops after this U (0 = only memory stops it)
    c.seed = 0
    c.warmup = 0                    # untimed rounds after the first (compiling, untimed) round
    c.repeats = 5                   # timed rounds per mode (the median is reported) ...
    c.min_repeats = 2               # ... at least this many ...
    c.max_seconds = 10.0            # ... and no more once the timed rounds exceed this many seconds
    c.loop_max_users = 64           # skip loop modes above this U (0: never skip): their tokens/s do
                                    # not grow with U, and at U=256 they add ~2 min on 2 cores
    c.matmul_size = 0               # n of the n x n x n peak matmul; 0 = 4096 CPU, 8192 accelerators
    c.out_dir = "runs/bench"        # bench.json and bench.md land here
    c.compilation_cache = True      # JAX's persistent compilation cache in ~/.cache/comigs_jax/data/xla (JAX_COMPILATION_CACHE_DIR wins): a warm cache makes the compile column the load time; False = compile afresh
    c.loss_atol = 1e-4              # modes must agree on first-round losses to this tolerance
    c.checkpoints = ""              # "" = the modes above; else ways of checkpointing to time instead, of
                                    # none,sync,async: each model's vmapped round at each U, a checkpoint of every
                                    # user's state after each round (comigs_jax.capacity.checkpoint_timing)
    c.checkpoint_rounds = 3         # timed rounds per way (the median is reported)
    # Several JAX processes (pod hosts; experiments/launch_local.py): experiments.run's block and
    # defaults. With more than one process only vmap_sharded runs, over every process's devices.
    c.distributed = base.get_config().distributed

    # Tiny config for the many-users sweep: the small base (2 layers, width 128, 4 heads),
    # vocabulary 2048, sequence 128, batch 2, 1 generalist + 1 specialist, rank 8 (attention
    # LoRA rank 8 too); a round = 2 expert steps + 1 router step. local_steps must be a multiple
    # of router_every (every round the same router phases).
    c.tiny = workload("pretrain", 2048, batch_size=2, local_steps=2, router_every=2, router_steps=1)
    # GPT-2 124M, the same mixture and round, batch 4.
    c.gpt2 = workload("gpt2", 50257, batch_size=4, local_steps=2, router_every=2, router_steps=1)
    c.gpt2.users = "2"              # U for the GPT-2 sweep
    # A small GPT-2 on the real vocabulary, the shape of a CPU study on real text: 4 layers, width
    # 256, 4 heads, vocabulary 50,257 (so the tied head is most of the FLOPs), batch 8 x 128,
    # 1 generalist + 1 specialist. The study's router does 10 steps every 30 expert steps; a round
    # here is 3 expert steps and 1 router step, the same steps in the same proportion (tokens/s and
    # FLOP/s are per step), ~10 s on 2 cores instead of ~2 min (`--config.mini.train.local_steps=30
    # --config.mini.train.router_every=30 --config.mini.train.router_steps=10` is the study's round).
    # Not in the default `models`.
    c.mini = workload("pretrain", 50257, batch_size=8, local_steps=3, router_every=3, router_steps=1)
    c.mini.pretrain.n_layer, c.mini.pretrain.n_embd, c.mini.pretrain.n_head = 4, 256, 4
    c.mini.users = "4"              # U for the mini sweep
    # SmolLM2-135M (Llama: 30 layers, width 576, 9 heads, 3 key/value heads, SwiGLU 1536, tied
    # head over 49,152 tokens) with random frozen weights, 1 generalist + 1 specialist (LoRA on
    # gate, up and down), rank 8 (q/k/v/o LoRA rank 8), batch 4 x 128, 2 expert steps + 1 router
    # step: a round is ~12 s on 2 quiet cores (docs/benchmarks.md). Not in the default `models`.
    c.smollm2 = workload("smollm2-135m", 49152, batch_size=4, local_steps=2, router_every=2, router_steps=1)
    c.smollm2.users = "2"           # U for the SmolLM2 sweep

    if preset == "gpu":
        c.models = "gpt2"
        c.modes = "loop_step,loop_round,vmap"
        c.gpt2.users = "1,8,64,128,192"
        c.gpt2.train.batch_size = 8
        c.gpt2.train.local_steps = 4
        c.gpt2.train.router_every = 4
        c.min_repeats = 3
        c.loop_max_users = 8
    elif preset != "cpu":
        raise ValueError(f"preset={preset!r}: allowed 'cpu', 'gpu'")
    return c
