"""Study: configs/many_users.py as a one-cell study, Local / FedAvg / CoMiGS on 256 real-text
users paired by seed (study.json's comparison, study.md's findings, per-user differences too).
experiments/many_users_report.py adds the table per language / domain group of users.

    python -m experiments.prepare_local_corpus --many-users --out data/many_users
    python -m experiments.study --config=configs/studies/many_users.py --workdir=runs/study_many_users
    python -m experiments.many_users_report --study=runs/study_many_users --out=docs/many_users.md
"""
from comigs_jax.experiment.study import default_study_group
from configs import many_users


def get_config(arg=None):
    c = many_users.get_config(arg)
    c.study = default_study_group("many_users")
    c.study.description = ("256 real-text users (man pages de/fr/ru/ja, stdlib code, Python docs, Shakespeare): "
                           "Local, FedAvg, CoMiGS paired by seed.")
    c.study.per_user_findings = False  # 256 users: the per-group table (many_users_report) instead
    return c
