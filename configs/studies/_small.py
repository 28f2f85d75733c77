"""The common base of the studies' default grids: the demo's synthetic users (4 users, a small
GPT-2 pretrained here on its own base chain, which is the users' shared chain unless a study sets
data.synthetic.base_knows_shared < 1), shrunk so a whole study's grid of methods x 5 seeds finishes
in <= 20 minutes on 2 quiet CPU cores. Not a study itself (no `study` group).

Point a study at real data with --config.data.* and --config.base (as configs/slimpajama.py).
"""
from comigs_jax.experiment.study import default_study_group
from configs import demo


def get_config(arg=None, name: str = "study"):
    c = demo.get_config(arg)
    c.methods = "comigs"
    c.seeds = "0,1,2,3,4"  # paired by seed: 5 for 95 % intervals that can detect small differences (2 give t = 12.7)
    c.federation.stack_seeds = True  # a cell's seeds as one program (one compile)
    c.data.n_users = 4
    c.data.train_tokens = 20_000
    c.data.valid_tokens = 5_000
    c.data.test_tokens = 5_000
    c.data.synthetic.vocab_size = 128
    c.data.synthetic.base_knows_shared = 1.0  # the base pretrained on the users' shared chain (the demo sets 0)
    c.train.lr = 5e-3  # fixed here: the demo's lr may change without changing this config
    c.model.rank = 4
    c.model.attn_rank = 4
    c.train.rounds = 20
    c.train.local_steps = 10
    c.train.batch_size = 8
    c.train.seq_len = 32
    c.train.router_every = 5
    c.train.router_steps = 2
    c.eval.every_rounds = 10
    c.eval.batch_size = 32
    c.checkpoint.every_rounds = 10
    c.pretrain.n_layer = 2
    c.pretrain.n_embd = 64
    c.pretrain.n_head = 4
    c.pretrain.steps = 200
    c.pretrain.batch_size = 16
    c.pretrain.tokens = 100_000
    c.output.figures = False  # per-run figures off; the study writes study.png
    c.output.progress = False
    c.study = default_study_group(name)
    return c
