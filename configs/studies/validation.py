"""Study e, the router's data: CoMiGS (router on the validation split) against comigs_train (router
on the training loss), in distribution and out of it. data.synthetic.target_share_shift = 0.6 draws
validation and test with each user's specific share moved to share + 0.6 (1 - share): a target
the training split under-represents, the paper's case for the bi-level split. The validation split
at 100 % and 10 % of data.valid_tokens (comigs_train reads none: its two cells of a shift differ
only by the validation stream it never reads).

    python -m experiments.study --config=configs/studies/validation.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "validation")
    c.study.description = ("Router on the validation split (comigs) vs on the training loss (comigs_train), with "
                           "validation and test in distribution (shift 0) or from an under-represented target "
                           "(shift 0.6), validation split at 100 / 10 %.")
    c.data.valid_tokens = 20_000
    c.methods = "comigs,comigs_train"
    c.study.grid = "data.synthetic.target_share_shift=0|0.6; data.valid_tokens=x1|x0.1"
    return c
