"""SlimPajama categories as users (paper §5), GPT-2 124M base, the reference's hyper-parameters.

    python -m experiments.run --config=configs/slimpajama.py:comigs --workdir=runs/slimpajama
Needs the Hugging Face Hub (or data.slimpajama.data_files with local files of the same schema).
"""
from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.data.source = "slimpajama"
    c.data.n_users = 4
    c.data.categories = "ArXiv,Book,Github,StackExchange"  # one category per user ("specific")
    c.data.train_tokens = 1_000_000
    c.data.valid_tokens = 200_000
    c.data.test_tokens = 200_000
    return c
