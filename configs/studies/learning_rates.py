"""Study h, learning rates: the experts' learning rate train.lr x the router's train.router_lr,
each at 0.3x, 1x and 3x the config's value (9 cells x 2 seeds). Only hyper-parameters that keep
shapes and the schedule vary, so the whole grid trains as ONE program per method
(study.one_program: every cell x seed a federation; lr a per-row value of the round program).

    python -m experiments.study --config=configs/studies/learning_rates.py
    python -m experiments.study --config=configs/studies/learning_rates.py --config.study.one_program=False
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "learning_rates")
    c.study.description = "Expert lr x router lr at 0.3x / 1x / 3x, every cell x seed a federation of one program."
    c.methods = "comigs"
    c.study.grid = "train.lr=x0.3|x1|x3; train.router_lr=x0.3|x1|x3"
    c.study.one_program = True
    return c
