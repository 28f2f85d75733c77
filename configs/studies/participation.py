"""Study f, unreliable users: participation 1.0 / 0.5 / 0.2 (the share of users that train and
upload in a round, sampled per round). Users that drop out in the middle of a round are not
available yet.

    python -m experiments.study --config=configs/studies/participation.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "participation")
    c.study.description = "Participation per round 1.0 / 0.5 / 0.2 for fedavg and comigs."
    c.methods = "fedavg,comigs"
    c.study.grid = "federation.participation=1.0|0.5|0.2"
    c.study.unavailable = ("drop-outs: users that start a round and drop out before uploading need a "
                           "federation.dropout the engine does not have yet (participation samples who trains)")
    return c
