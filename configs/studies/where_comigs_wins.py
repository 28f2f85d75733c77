"""Study g, where CoMiGS wins: on synthetic users, heterogeneity (each user's share of its own chain)
(training tokens per user: 4,000) x how much of the users' shared chain the base already knows
(data.synthetic.base_knows_shared: 1, the base was pretrained on it; 0, on an unrelated chain, so
the generalists have something to learn together). Every method at its own best learning rate of
train.lr = 1x, 3x (study.tune; the lr cells of a configuration train as one program per method).
Test perplexity of local, fedavg, pfedmoe and comigs over the exact Bayes floor; the win map shows
per cell the winner (its paired 95 % interval excludes 0 against every other method) or the tie.

    python -m experiments.study --config=configs/studies/where_comigs_wins.py

Default grid: 2 heterogeneity levels x 2 base-knowledge levels x 2 lr at 4,000 training tokens per
user, 4 methods x 5 seeds: 16 programs of 10 federations (estimated 20 min on 2 quiet cores). Cut
to fit 20 minutes: the middle heterogeneity level (0.3-0.5), the 40,000-token level (add it with
--config.study.grid="...; data.train_tokens=4000|40000", twice the time) and the 0.3x lr of study
h (never the best there).
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "where_comigs_wins")
    c.study.description = ("Heterogeneity x training tokens per user x what the base knows of the shared chain, each "
                           "method at its best lr: test ppl over the exact Bayes floor, the winner or tie per cell.")
    c.methods = "local,fedavg,pfedmoe,comigs"
    c.data.train_tokens = 4_000
    c.study.grid = ("data.synthetic.specific_share_min&data.synthetic.specific_share_max=0.05&0.15|0.7&0.9; "
                    "data.synthetic.base_knows_shared=1|0; train.lr=x1|x3")
    c.study.tune = "train.lr"
    c.study.one_program = True
    c.study.figure = "win_map"
    return c
