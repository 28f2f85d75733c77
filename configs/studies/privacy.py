"""Study i, privacy: user-level DP of the shared leaves (DP-FedAvg: each uploading user's update
clipped to dp.clip over all its shared leaves, Gaussian noise on their sum, divided by the expected
participants) at epsilon = inf (no DP), 8 and 2 after the run's rounds at delta = 1e-3, for FedAvg
(every expert and the attention LoRA shared, so all of it is noised) and CoMiGS (only the generalist
and the attention LoRA; specialists and router never leave the device and cost no privacy). The
clip C = 0.5 binds for most uploads (the median update norm of the shared leaves was 0.7-1.1 for
CoMiGS and 1.0-1.5 for FedAvg per round in a measured run of 10 rounds x 5 steps), so the epsilon = 8 and 2 cells differ
from the inf cells by clipping as well as noise.

256 synthetic users (user-level DP needs many: the noise on the mean is sigma C / (q N)), each round
a Poisson sample with q = 0.25 (64 expected participants), the same sampling in every cell; sigma is
calibrated to each epsilon before training (dp.target_epsilon, the RDP accountant). The users train
in chunks of train.user_chunk rows per device. Every cell is one program of 5 seeds. 8 rounds x 4
local steps of 4 x 32 tokens: sized from a measured small version (docs/studies.md) to about 20
minutes on 2 quiet cores.

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
    # one method per cell: every cell compared with every other paired by seed (study.md's across_cells):
    # each method's cost of privacy (its inf cell against its 8 and 2) and the methods at each epsilon
    c.study.grid = ("methods&dp.enabled&dp.target_epsilon=fedavg&False&0|fedavg&True&8|fedavg&True&2|"
                    "comigs&False&0|comigs&True&8|comigs&True&2")
    return c
