"""The main job's embedded default: synthetic heterogeneous users, a small GPT-2 pretrained here
on their shared chain, then CoMiGS. Under 3 minutes on 2 CPU cores, no network.

    python -m experiments.run                                   # CoMiGS
    python -m experiments.run --config=configs/demo.py:fedavg   # another method
    python -m experiments.run --config.methods=local,fedavg,pfedmoe,comigs --config.seeds=0,1
"""
from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.base = "pretrain"
    c.seed = 0
    c.data.source = "synthetic"
    c.data.n_users = 4
    c.data.train_tokens = 40_000
    c.data.valid_tokens = 20_000
    c.data.test_tokens = 20_000
    c.data.synthetic.vocab_size = 256
    c.train.batch_size = 16
    c.train.seq_len = 64
    c.train.lr = 5e-3
    c.train.router_lr = 5e-3
    c.eval.n_windows = 256
    c.pretrain.steps = 400
    c.pretrain.tokens = 300_000
    return c
