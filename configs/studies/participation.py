"""Study f, unreliable users: participation 1.0 / 0.5 / 0.2 (the share of users that train and
upload in a round, sampled per round), and drop-outs 0 / 0.3 (federation.dropout: the probability
that a participating user stops at a uniformly random local step of the round; it keeps the steps
it made and does not take part in that round's aggregation). A user that sits out also skips its
local steps, in every method: Local at the same participation is the control for that lost compute
(Local never aggregates after round 0, so what fedavg and comigs gain over it at a participation is
collaboration). A switch where a user that sits out still trains but does not upload is not there
yet (it belongs in experiment/simulation.py).

    python -m experiments.study --config=configs/studies/participation.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "participation")
    c.study.description = ("Participation per round 1.0 / 0.5 / 0.2 x mid-round drop-outs 0 / 0.3, "
                           "for local, fedavg and comigs.")
    c.methods = "local,fedavg,comigs"
    c.study.grid = "federation.participation=1.0|0.5|0.2;federation.dropout=0.0|0.3"
    return c
