"""A seconds-long run for tests and smoke checks: 3 synthetic users, a 1-layer base pretrained
here, 4 rounds x 3 steps. Same code paths as the demo, far smaller.

    python -m experiments.run --config=configs/tiny.py --workdir=/tmp/tiny
"""
from configs import demo


def get_config(arg=None):
    c = demo.get_config(arg)
    c.data.n_users = 3
    c.data.train_tokens = 3_000
    c.data.valid_tokens = 1_000
    c.data.test_tokens = 1_000
    c.data.synthetic.vocab_size = 64
    c.methods = ""  # one method: `method` (the demo compares three)
    c.data.synthetic.base_knows_shared = 1.0  # the base pretrained on the users' shared chain (the demo sets 0)
    c.train.lr = 5e-3  # fixed here: the demo's lr may change without changing this config
    c.model.rank = 4
    c.model.attn_rank = 4
    c.train.rounds = 4
    c.train.local_steps = 3
    c.train.batch_size = 4
    c.train.seq_len = 16
    c.train.router_every = 3
    c.train.router_steps = 2
    c.eval.n_windows = 16
    c.eval.batch_size = 8
    c.eval.every_rounds = 2
    c.checkpoint.every_rounds = 2
    c.checkpoint.max_to_keep = 3
    c.pretrain.n_layer = 1
    c.pretrain.n_embd = 32
    c.pretrain.n_head = 2
    c.pretrain.steps = 40
    c.pretrain.batch_size = 8
    c.pretrain.tokens = 20_000
    c.output.progress = False
    return c
