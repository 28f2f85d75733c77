"""Hundreds of users on real text: 256 users of the offline corpus (one per man-page family in
German, French, Russian and Japanese, per standard-library module, per Python-docs tree, per
Shakespeare play; sizes heavy-tailed, capped at the split sizes below), a small GPT-2 pretrained
here on the corpus's held-out units, Local / FedAvg / CoMiGS x 3 seeds (each method's seeds one
program), a quarter of the users training each round, users trained and scored in chunks.
Sized for 2 CPU cores (docs/many_users.md has the time); the same command runs on a pod.

    python -m experiments.prepare_local_corpus --many-users --out data/many_users     # ~1-2 min
    python -m experiments.run --config=configs/many_users.py --workdir=runs/many_users
    python -m experiments.study --config=configs/studies/many_users.py --workdir=runs/study_many_users

Another folder: --config.data.text_files.root=DIR --config.data.tokenizer=DIR/.tokenizer
--config.pretrain.text=DIR/.heldout. On an accelerator, raise train.rounds, train.batch_size,
the model (pretrain.*) and the split sizes.
"""
from configs import base

ROOT = "data/many_users"


def get_config(arg=None):
    c = base.get_config(arg)
    c.methods = "local,fedavg,comigs"
    c.seeds = "0,1,2"
    c.federation.stack_seeds = True  # a method's 3 seeds: 3 federations of one program
    c.federation.participation = 0.25  # 64 of the 256 users train each round
    c.train.user_chunk = 64  # users trained and scored 64 at a time: live activations are a chunk's

    c.data.source = "text_files"
    c.data.text_files.root = ROOT
    c.data.tokenizer = ROOT + "/.tokenizer"  # the byte-level BPE trained on the held-out units (1,024 tokens)
    c.data.n_users = 256
    c.data.train_tokens = 16_000  # caps: a smaller user keeps all its text, split in these proportions
    c.data.valid_tokens = 1_024
    c.data.test_tokens = 1_024  # 16 windows per user and seed: each evaluation scores 3 x 256 x 16 windows
    c.data.allow_fewer_tokens = True  # sizes follow the corpus (>= --min-tokens each), not the caps
    c.data.min_tokens = 65  # a split holds at least one window (seq_len + 1)

    c.base = "pretrain"
    c.pretrain.text = ROOT + "/.heldout"  # units no user holds: every language and domain, other texts
    c.pretrain.n_layer = 2
    c.pretrain.n_embd = 64
    c.pretrain.n_head = 4
    c.pretrain.steps = 600
    c.pretrain.batch_size = 32
    c.pretrain.tokens = 2_000_000

    c.model.rank = 4
    c.model.attn_rank = 4
    c.train.rounds = 12
    c.train.local_steps = 4
    c.train.batch_size = 2
    c.train.seq_len = 64
    c.train.lr = 5e-3
    c.train.router_lr = 5e-3
    c.train.router_every = 4  # a router step after every round's expert steps
    c.train.router_steps = 1
    c.eval.every_rounds = 6
    c.eval.batch_size = 16  # one batch per user: a chunk of 64 users scores 64 x 16 windows at a time (vocab-wide logits)
    c.checkpoint.every_rounds = 6
    c.output.progress = False
    return c
