"""Study d, routing granularity: a token-level router (comigs) vs one learned weight per user and
layer (comigs_user_router: a router without token input, trained on the validation loss like
CoMiGS's) vs uniform mixing of the same generalist + specialist (comigs_uniform: shared
generalists, local specialists, no router), with pfedmoe (token router trained jointly) for
reference, at low and high heterogeneity.

    python -m experiments.study --config=configs/studies/granularity.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "granularity")
    c.study.description = ("Token-level router vs one learned weight per user vs uniform mixing, "
                           "at low and high heterogeneity.")
    c.methods = "comigs,comigs_user_router,comigs_uniform,pfedmoe"
    c.study.grid = "data.synthetic.specific_share_min&data.synthetic.specific_share_max=0.05&0.15|0.7&0.9"
    return c
