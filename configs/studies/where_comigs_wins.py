"""Study g, where CoMiGS wins: on synthetic users, heterogeneity (each user's share of its own
specific chain) x training tokens per user -> test perplexity of local, fedavg, pfedmoe and comigs
over the exact Bayes floor, and a map of which method wins (study.png).

    python -m experiments.study --config=configs/studies/where_comigs_wins.py

Default grid: 3 heterogeneity levels x 2 data sizes, 4 methods x 2 seeds (seeds as one program).
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "where_comigs_wins")
    c.study.description = ("Heterogeneity (synthetic specific share, user 0 .. user 3) x training tokens per user: "
                           "test ppl over the exact Bayes floor, and the best method per cell.")
    c.methods = "local,fedavg,pfedmoe,comigs"
    c.study.grid = ("data.synthetic.specific_share_min&data.synthetic.specific_share_max=0.05&0.15|0.3&0.5|0.7&0.9; "
                    "data.train_tokens=4000|40000")
    c.study.figure = "win_map"
    return c
