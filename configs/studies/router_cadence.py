"""Study b, router cadence (open question 3): the router period tau (train.router_every, in expert
steps) x router steps per phase, perplexity against communication cost. The router is local, so a
round's upload (the generalists and attention LoRA) does not depend on the cadence: every cell
communicates the same; the figure shows what the cadence buys at that cost.

    python -m experiments.study --config=configs/studies/router_cadence.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "router_cadence")
    c.study.description = "CoMiGS: router period tau (expert steps) x router steps per phase (open question 3)."
    c.methods = "comigs"
    c.study.grid = "train.router_every=2|5|25; train.router_steps=1|5"
    c.study.figure = "ppl_vs_communication"
    return c
