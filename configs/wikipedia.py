"""Multilingual Wikipedia, one language per user (paper §5), GPT-2 124M base.

    python -m experiments.run --config=configs/wikipedia.py:comigs --config.data.categories=de,fr,it,nl
"""
from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.data.source = "wikipedia"
    c.data.n_users = 4
    c.data.categories = "de,fr,it,nl"
    c.data.train_tokens = 840_000
    c.data.valid_tokens = 160_000
    c.data.test_tokens = 160_000
    return c
