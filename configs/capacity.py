"""Every default of the capacity model (comigs_jax.capacity), one line each.

    python -m comigs_jax.capacity                                             # 1,000 users of GPT-2 124M
    python -m comigs_jax.capacity --config.users=1000 --config.train.batch_size=16 --config.model.n_experts=4
    python -m comigs_jax.capacity --config=configs/capacity.py:tiny --config.measure=16,64
    python -m comigs_jax.capacity --config.train.user_chunk=8 --config.model.remat=block   # users in chunks of 8

The `model` and `train` groups are experiments.run's (configs/base.py: same keys, same meaning);
`base` names the frozen base's shape as experiments.run's `base` does ("gpt2" ... "gpt2-xl", the
Llama sizes "smollm2-135m" and "llama-3.2-1b", or "pretrain": the small base of `pretrain.n_layer /
n_embd / n_head`), without loading it; `vocab_size` 0 (the default) is that base's own vocabulary
(50,257 for GPT-2 and "pretrain", 49,152 for smollm2-135m, 128,256 for llama-3.2-1b). The
defaults are the issue's example: GPT-2 124M, 1 generalist + 1 specialist, rank 8 (attention
LoRA rank 8), 64 x 128 windows, bfloat16 activations, the reference's schedule (10 local steps,
a 10-step router phase every 30 steps). `:tiny` is the benchmark's tiny workload
(configs/bench.py) as tests/test_capacity.py checks it against the compiled program on CPU.
`train.user_chunk` (a device runs its users that many at a time: it holds every user's state but
one chunk's activations) and `model.remat` (what the backward recomputes) change the plan. The
`server` and `dp` groups are experiments.run's too: a server optimizer (`server.optimizer=adam`:
its value and moments per row), DP-FedAvg (`dp.enabled=True`: the round-start copy of the shared
leaves) and `model.ranks` (set: each row's ranks) add the server's state per row to the plan.
"""
from ml_collections import ConfigDict

from configs import base

PRESETS = ("gpt2", "tiny")


def shape_groups(c: ConfigDict, *, base_name: str, vocab_size: int) -> ConfigDict:
    """Adds the keys that say what model runs, shared by this file and configs/bench.py:
    `base`, `vocab_size`, `pretrain` (the small base's shape) and configs/base.py's `model` and
    `train` groups (comigs_jax.configuration.engine_configs builds the engine's configs from them)."""
    defaults = base.get_config()
    c.base = base_name  # the frozen base's shape: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | smollm2-135m | llama-3.2-1b | pretrain (below)
    c.vocab_size = vocab_size  # vocabulary; 0 = the named base's own (GPT-2's 50257 for gpt2* and pretrain)
    c.pretrain = ConfigDict()  # base="pretrain" only: the small base's shape (experiments.run's keys)
    c.pretrain.n_layer = defaults.pretrain.n_layer  # layers
    c.pretrain.n_embd = defaults.pretrain.n_embd  # width
    c.pretrain.n_head = defaults.pretrain.n_head  # heads
    c.model = defaults.model  # configs/base.py's: dtype, n_experts, n_generalists, top_k, rank, attn_rank, remat, ...
    c.train = defaults.train  # configs/base.py's: local_steps, batch_size, seq_len, router_every, user_chunk, ...
    return c


def get_config(preset: str = "gpt2") -> ConfigDict:
    c = ConfigDict()
    c.users = 1000  # users U to plan for
    c.method = "comigs"  # a method of comigs_jax.federated.methods (which roles train, which router)
    shape_groups(c, base_name="gpt2", vocab_size=0)
    c.model.dtype = "bfloat16"  # activation dtype (the accelerators' training dtype; parameters stay float32)
    c.train_tokens = 1_000_000  # training tokens per user held on device
    c.valid_tokens = 100_000  # validation tokens per user held on device (add the test split's if it stays there)
    c.targets = "h100,h200,tpu-v4,tpu-v5e"  # chips to plan for, comma-separated (comigs_jax.capacity.TARGETS)
    c.mfu = 0.35  # assumed model FLOP utilisation for the time per round (experiments.bench measures it)
    c.usable = 0.9  # usable fraction of each chip's memory (the rest: runtime, fragmentation, evaluation)
    c.profile = "accelerator"  # kept activations: accelerator (XLA GPU/TPU fusion) | cpu (JAX's saved residuals)
    c.measure = ""  # comma-separated U (e.g. "16,64"): also compile the round program at these U and compare
    defaults = base.get_config()
    c.server = defaults.server  # configs/base.py's: optimizer (none | sgd | adam | yogi | adagrad), lr, momentum, b1, b2, tau
    c.dp = defaults.dp  # configs/base.py's: enabled (True: DP-FedAvg's round-start copy per row), clip, noise_multiplier, ...

    if preset == "tiny":  # configs/bench.py's tiny workload; the CPU check of docs/scaling.md
        c.base, c.vocab_size = "pretrain", 2048
        c.model.dtype = "float32"
        c.train.batch_size, c.train.local_steps, c.train.router_every, c.train.router_steps = 2, 2, 2, 1
        c.train_tokens, c.valid_tokens = 8192, 4096
        c.profile = "cpu"
    elif preset != "gpt2":
        raise ValueError(f"preset={preset!r}: allowed {', '.join(PRESETS)}")
    return c
