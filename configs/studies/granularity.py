"""Study d, routing granularity: a token-level router (comigs) vs uniform mixing of the same
generalist + specialist (comigs_uniform: shared generalists, local specialists, no router), with
pfedmoe (token router trained jointly) for reference, at low and high heterogeneity. One learned
weight per user (a token-independent router) is not available yet.

    python -m experiments.study --config=configs/studies/granularity.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "granularity")
    c.study.description = "Token-level router vs uniform mixing, at low and high heterogeneity."
    c.methods = "comigs,comigs_uniform,pfedmoe"
    c.study.grid = "data.synthetic.specific_share_min&data.synthetic.specific_share_max=0.05&0.15|0.7&0.9"
    c.study.unavailable = ("per-user weight: one learned weight per user (a router without token input) needs a "
                           "router kind the model does not have yet (comigs_jax/model/moe.py: learned | uniform)")
    return c
