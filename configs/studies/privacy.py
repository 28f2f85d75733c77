"""Study i, privacy: user-level DP of the shared leaves (DP-FedAvg: each uploading user's update
clipped to dp.clip over all its shared leaves, Gaussian noise on their sum, divided by the expected
participants) at epsilon = inf (no DP), 8 and 2 after the run's rounds at delta = 1e-3, for FedAvg
(every expert and the attention LoRA shared, so all of it is noised) and CoMiGS (only the generalist
and the attention LoRA; specialists and router never leave the device and cost no privacy).

256 synthetic users (user-level DP needs many: the noise on the mean is sigma C / (q N)), each round
a Poisson sample with q = 0.25 (64 expected participants), the same sampling in every cell; sigma is
calibrated to each epsilon before training (dp.target_epsilon, the RDP accountant). The users train
in chunks of train.user_chunk rows per device. Every cell x method is one program of 5 seeds.

    python -m experiments.study --config=configs/studies/privacy.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "privacy")
    c.study.description = ("User-level DP of the shared leaves at epsilon inf / 8 / 2 (delta 1e-3), "
                           "FedAvg and CoMiGS, 256 users, Poisson participation q = 0.25.")
    c.methods = "fedavg,comigs"
    c.data.n_users = 256
    c.data.train_tokens = 4_000
    c.data.valid_tokens = 1_000
    c.data.test_tokens = 2_000
    c.federation.sampling = "poisson"
    c.federation.participation = 0.25
    c.train.rounds = 10
    c.train.local_steps = 5
    c.train.batch_size = 4
    c.train.router_every = 5
    c.train.router_steps = 2
    c.train.user_chunk = 256
    c.eval.every_rounds = 10
    c.checkpoint.every_rounds = 10
    c.output.per_user_limit = 8
    c.dp.clip = 0.5
    c.dp.delta = 1e-3
    c.study.grid = "dp.enabled&dp.target_epsilon=False&0|True&8|True&2"
    return c
