"""The registry of servers (comigs_jax.federated.server.Server): name -> rule, one module each.

A new rule is a module here defining SERVER and one line in SERVERS; a method names it in
`Method.server` (comigs_jax/federated/methods.py). A stage that any averaging rule can end with
(the server optimizers, servers/optimizer.py) wraps the rule's record instead (`server_for`).
"""
from __future__ import annotations

from comigs_jax.federated.server import Server
from comigs_jax.federated.servers import dp_mean, hetlora, mean, none, pcl, ranked

SERVERS: dict[str, Server] = {s.name: s for s in (
    mean.SERVER,                   # the masked mean of the shared leaves (FedAvg, CoMiGS's generalists)
    dp_mean.SERVER,                # the mean under user-level DP: clipped updates, Gaussian noise (dp.enabled)
    ranked.MASKED_MEAN,            # the mean per rank component (users of different ranks)
    hetlora.HETLORA,               # HetLoRA (the paper): a rank per user, self-pruning, |dW|-share mean
    hetlora.HETLORA_REFERENCE,     # HetLoRA as the reference code: a rank per LoRA module (faithful)
    ranked.FLEXLORA,               # FlexLoRA: SVD of the token-weighted mean of the products
    ranked.FLEXLORA_REFERENCE,     # FlexLoRA as the reference code (D3, D3b)
    pcl.SERVER,                    # PCL: no server; softmax(-ppl) mixing of whole models
    none.SERVER,                   # one-round methods: synchronised at round 0 only
)}


def server_for(method, ranked: bool, optimizer=None, private: bool = False) -> Server:
    """The server of `method`'s run: its `server`, the rank-masked mean for the mean when the
    users have ranks (model.ranks), DP-FedAvg's clipped, noised mean for the mean under DP
    (`private`; configuration refuses DP with any other server), followed by the server optimizer
    `optimizer` (comigs_jax.federated.server_optimizer.ServerOptimizer; None: none), whose
    pseudo-gradient is then the server value minus the noised mean. The one place a server is chosen."""
    name = method.server
    if name == "mean" and private:
        name = dp_mean.SERVER.name
    elif name == "mean" and ranked:
        name = ranked_mean_name()
    if optimizer is None:
        return SERVERS[name]
    from comigs_jax.federated.servers.optimizer import with_optimizer
    return with_optimizer(SERVERS[name], optimizer)


def ranked_mean_name() -> str:
    return ranked.MASKED_MEAN.name
