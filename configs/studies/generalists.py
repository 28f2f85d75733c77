"""Study a, generalists (open question 1): 4 experts per user and top-2 routing fixed, 0, 1, 2 or 3
of them generalists (shared) and the rest specialists (local), beside Local (all 4 experts local,
uniform mixture): sharing varies, capacity does not. 0 generalists: only the attention LoRA is
shared. One method per cell: the cells are compared paired by seed (study.json's across_cells).

    python -m experiments.study --config=configs/studies/generalists.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "generalists")
    c.study.description = ("4 experts, top-2 fixed: CoMiGS with 0..3 generalists (the rest specialists) and Local "
                           "(open question 1).")
    c.methods = "comigs"
    c.model.n_experts = 4
    c.model.top_k = 2
    c.study.grid = "methods&model.n_generalists=local&0|comigs&0|comigs&1|comigs&2|comigs&3"
    return c
