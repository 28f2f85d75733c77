"""Study c, resources (the paper's system-heterogeneity table): specialist counts per user against
each user's data size. High-resource users (more training tokens) get more specialists,
low-resource users fewer; compared with the same counts reversed and with equal counts. The data
sizes are data.train_shares (each user's share of its training split): users 0, 1 keep 10 %. Read
per user (study.per_user_findings): the paper's claim is robustness, that low-resource users given
more specialists do not overfit (users 0, 1 in 4,4,2,2 against 2,2,2,2).

    python -m experiments.study --config=configs/studies/resources.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "resources")
    c.study.description = ("Per-user expert counts (1 generalist + specialists) against per-user data size "
                           "(users 0, 1 low-resource, users 2, 3 high-resource).")
    c.methods = "comigs"
    c.model.n_experts = 4
    c.data.train_tokens = 40_000
    c.data.train_shares = "0.1,0.1,1,1"  # users 0, 1: 4,000 training tokens; users 2, 3: 40,000
    c.study.grid = "model.expert_counts=2,2,2,2|2,2,4,4|4,4,2,2"
    c.study.per_user_findings = True  # the paper's claim is per user: low-resource users given more experts
    return c
