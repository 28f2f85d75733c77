"""Study f, unreliable users: participation 1.0 / 0.5 / 0.2 (the share of users that upload in a
round, sampled per round), what a user that does not participate does (federation.sit_out: `skip`,
no local steps, so less compute AND less collaboration; `train`, all its local steps and no upload,
so less collaboration only), and drop-outs 0 / 0.3 (federation.dropout: the probability that a
participating user stops at a uniformly random local step of the round; it keeps the steps it made
and does not take part in that round's aggregation). Local is the control for the compute a skipping
user loses (Local never aggregates after round 0, so under `train` it is Local at participation 1).

    python -m experiments.study --config=configs/studies/participation.py

Participation 1.0 has nobody sitting out, so it runs once (`skip`): 5 x 2 cells x 3 methods x 5 seeds.
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "participation")
    c.study.description = ("Participation per round 1.0 / 0.5 / 0.2, a sitting-out user skipping its local steps "
                           "or training without uploading, x mid-round drop-outs 0 / 0.3, for local, fedavg and comigs.")
    c.methods = "local,fedavg,comigs"
    c.study.grid = ("federation.participation&federation.sit_out=1.0&skip|0.5&skip|0.5&train|0.2&skip|0.2&train; "
                    "federation.dropout=0.0|0.3")
    return c
