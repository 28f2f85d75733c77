"""Offline real text: users from the folder that experiments/prepare_local_corpus.py builds
(man pages in de/fr/ru/ja, Python stdlib code, Python docs, Shakespeare), tokenised with the
bundled GPT-2 BPE. The base defaults to GPT-2 124M (hub, or a local directory via --config.base).

    python -m experiments.prepare_local_corpus --out data/local_corpus
    python -m experiments.run --config=configs/local_text.py --config.base=/path/to/gpt2
"""
from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.data.source = "text_files"
    c.data.text_files.root = "data/local_corpus"
    c.data.n_users = 4
    c.data.categories = "de,fr,code,shakespeare"
    c.data.train_tokens = 400_000
    c.data.valid_tokens = 50_000
    c.data.test_tokens = 50_000
    return c
