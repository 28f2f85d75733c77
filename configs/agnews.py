"""AG News, the reference's "mixed" users: user 0 = 1/4 World + 3/4 Sports, user 1 = 3/4 World +
1/4 Sports, users 2-3 the same with Business and Sci/Tech (method.md §6). GPT-2 124M base.

    python -m experiments.run --config=configs/agnews.py:comigs --workdir=runs/agnews
"""
from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.data.source = "agnews"
    c.data.n_users = 4
    c.data.categories = "World,Sports,Business,Sci/Tech"
    c.data.partition = "mixed"
    c.data.mixed_share = 0.25
    c.data.train_tokens = 600_000
    c.data.valid_tokens = 100_000
    c.data.test_tokens = 100_000
    return c
