"""Study e, scarce validation data: the router's validation split at 100 %, 10 % and 1 % of the
config's data.valid_tokens (x1, x0.1, x0.01 scale any source's value), and routing on the training
loss instead (comigs_train, which reads no validation data).

    python -m experiments.study --config=configs/studies/validation.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "validation")
    c.study.description = "Router validation split at 100 / 10 / 1 %, and routing on the training loss."
    c.data.valid_tokens = 20_000  # 1 % = 200 tokens: above data.min_tokens (129)
    c.methods = "comigs"
    c.study.grid = "methods&data.valid_tokens=comigs&x1|comigs&x0.1|comigs&x0.01|comigs_train&x1"
    return c
