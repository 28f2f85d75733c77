"""Study b, router cadence (open question 3) at equal router budgets: the router period tau
(train.router_every, in expert steps) and the router steps per phase, linked so that every cell of
a budget makes the same total number of router steps (200 expert steps per run: 200 / tau phases
x steps per phase). Budget 40: tau 5 x 1, 10 x 2, 25 x 5; budget 200: tau 2 x 2, 5 x 5, 25 x 25. The
budget is the second axis of the comparison (the cells of budget 40 against those of 200). The
router is local, so every cell communicates the same: no communication axis.

    python -m experiments.study --config=configs/studies/router_cadence.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "router_cadence")
    c.study.description = ("CoMiGS: router period tau x router steps per phase at equal total router steps "
                           "(budget 40: 5x1, 10x2, 25x5; budget 200: 2x2, 5x5, 25x25) (open question 3).")
    c.methods = "comigs"
    c.study.grid = "train.router_every&train.router_steps=5&1|10&2|25&5|2&2|5&5|25&25"
    return c
