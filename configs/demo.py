"""The main job's embedded default: 4 synthetic heterogeneous users whose shared chain the base does
not know (data.synthetic.base_knows_shared = 0: a small GPT-2 is pretrained here on its own, unrelated
chain), then Local, FedAvg and CoMiGS on the same data, base and seed, each user's test perplexity
beside its exact Bayes floor. Under 3 minutes on 2 CPU cores, no network. One seed: the table states
no difference between the methods (it says so and names the study that does).

    python -m experiments.run                                   # local, fedavg, comigs
    python -m experiments.run --config=configs/demo.py:fedavg   # one method
    python -m experiments.run --config.methods=local,fedavg,pfedmoe,comigs --config.seeds=0,1,2,3,4
"""
from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.base = "pretrain"
    c.seed = 0
    if arg is None:  # the main job compares; configs/demo.py:METHOD runs one method
        c.methods = "local,fedavg,comigs"
    c.data.source = "synthetic"
    c.data.n_users = 4
    c.data.train_tokens = 40_000
    c.data.valid_tokens = 20_000
    c.data.test_tokens = 20_000
    c.data.synthetic.vocab_size = 256
    c.data.synthetic.base_knows_shared = 0.0  # the generalists have something to learn together
    c.train.batch_size = 8  # three methods within 3 minutes on 2 cores
    c.train.seq_len = 64
    c.train.lr = 5e-3  # study h's best is 3x this where the base knows the shared chain; no grid was run for this setting
    c.train.router_lr = 5e-3
    c.eval.n_windows = 256
    c.eval.every_rounds = 5  # the test table at rounds 5, 10, 15, 20 (evaluation is a large share of a 3-method run)
    c.pretrain.steps = 400
    c.pretrain.tokens = 300_000
    return c
