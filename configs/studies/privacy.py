"""Study i, privacy: user-level DP of the shared leaves (DP-FedAvg: each uploading user's update
clipped to dp.clip over all its shared leaves, Gaussian noise on their sum, divided by the expected
participants) at epsilon = inf (no DP), 8 and 2 after the run's rounds at delta = 1e-3, for FedAvg
(every expert and the attention LoRA shared, so all of it is noised) and CoMiGS (only the generalist
and the attention LoRA; specialists and router never leave the device and cost no privacy), each with
the mean as its server and with a server optimizer: FedAvgM (server.lr 0.1,
momentum 0.9: the effective lr eta / (1 - beta) = 1 of Hsu et al. 2019; McMahan et al. 2018 ran
DP-FedAvg with server momentum), the lowest of seven server settings for CoMiGS at epsilon = 2 in a
pilot on other seeds (100, 101; docs/studies/privacy_pilot.md). The clip C = 0.5 binds for most uploads
(the median update norm of the shared leaves was 0.7-1.1 for CoMiGS and 1.0-1.5 for FedAvg per round
in a measured run of 10 rounds x 5 steps), so the epsilon = 8 and 2 cells differ from the inf cells by
clipping as well as noise.

Both methods in every cell of epsilon x server: the findings compare them in each cell, each method
with itself between cells (its cost of privacy with either server; the server's effect at each
epsilon), whether the two methods change differently, and whether a method's cost of privacy differs
between the servers (each a difference paired by seed with its 95 % interval).

256 synthetic users (user-level DP needs many: the noise on the mean is sigma C / (q N)), each round
a Poisson sample with q = 0.25 (64 expected participants), the same sampling in every cell; sigma is
calibrated to each epsilon before training (dp.target_epsilon, the RDP accountant). The users train
in chunks of train.user_chunk rows per device. 5 seeds, stacked as one program per cell and method.
8 rounds x 4 local steps of 4 x 32 tokens: sized from a measured small version (docs/studies.md).

    python -m experiments.study --config=configs/studies/privacy.py
"""
from configs.studies import _small


def get_config(arg=None):
    c = _small.get_config(arg, "privacy")
    c.study.description = ("User-level DP of the shared leaves at epsilon inf / 8 / 2 (delta 1e-3), the mean or "
                           "a FedAvgM server, FedAvg and CoMiGS, 256 users, Poisson participation q = 0.25.")
    c.methods = "fedavg,comigs"
    c.data.n_users = 256
    c.data.train_tokens = 4_000
    c.data.valid_tokens = 1_000
    c.data.test_tokens = 1_000
    c.federation.sampling = "poisson"
    c.federation.participation = 0.25
    c.train.rounds = 8
    c.train.local_steps = 4
    c.train.batch_size = 4
    c.train.router_every = 4
    c.train.router_steps = 2
    c.train.user_chunk = 256
    c.eval.every_rounds = 8
    c.checkpoint.every_rounds = 8
    c.output.per_user_limit = 8
    c.dp.clip = 0.5
    c.dp.delta = 1e-3
    # epsilon x server, both methods in each cell: 3 x 2 cells x 2 methods; the two axes give each
    # method's interaction of privacy and server (study_interactions: its cost of privacy with either)
    c.study.grid = ("dp.enabled&dp.target_epsilon=False&0|True&8|True&2; "
                    "server.optimizer&server.momentum&server.lr=none&0&1|sgd&0.9&0.1")
    return c
