"""Study a, generalists (open question 1): 0, 1, 2 or 3 generalists with the specialists fixed (one
per user; top-k 2, 1 with a single expert). 0 generalists: only the attention LoRA is shared.

    python -m experiments.study --config=configs/studies/generalists.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "generalists")
    c.study.description = "CoMiGS with 0..3 generalists and one specialist per user (open question 1)."
    c.methods = "comigs"
    c.study.grid = "model.n_generalists&model.n_experts&model.top_k=0&1&1|1&2&2|2&3&2|3&4&2"
    return c
