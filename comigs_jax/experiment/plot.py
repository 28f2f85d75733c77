"""Figures of a run (PNG, matplotlib): loss curves, generalist share per layer, a token-level
routing picture, and the comparison across methods."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(path: str, records: list[dict], users: list[str]) -> None:
    fig, ax = plt.subplots(1, 2 if "router_val_ce" in records[0] else 1, figsize=(10, 3.5), squeeze=False)
    steps = [r["step"] for r in records]
    for i, u in enumerate(users[: len(records[0]["train_ce"])]):
        ax[0, 0].plot(steps, [r["train_ce"][i] for r in records], label=u)
    ax[0, 0].set(xlabel="expert step", ylabel="train cross-entropy", title="experts (train split)")
    ax[0, 0].legend(fontsize=7)
    if ax.shape[1] > 1:
        for i, u in enumerate(users[: len(records[0]["router_val_ce"])]):
            pts = [(r["step"], r["router_val_ce"][i]) for r in records if r["router_val_ce"][i] is not None]
            if pts:
                ax[0, 1].plot(*zip(*pts), "o-", label=u)
        ax[0, 1].set(xlabel="expert step", ylabel="validation cross-entropy", title="router phases (valid split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generalist_share_per_layer(path: str, results: dict, n_generalists: int) -> None:
    probs = np.asarray(results["routing_per_layer"])  # [U, L, E]
    share = probs[..., :n_generalists].sum(-1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    n_users, n_layers = share.shape
    width = 0.8 / n_users
    for i, u in enumerate(results["users"]):
        ax.bar(np.arange(n_layers) + i * width, share[i], width, label=u["user"])
    ax.set(xlabel="layer", ylabel="generalist routing share", ylim=(0, 1), title=f"{results['method']}: test split")
    ax.set_xticks(np.arange(n_layers) + 0.4 - width / 2, [str(l) for l in range(n_layers)])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routing_picture(path: str, pieces: list[str], weights: np.ndarray, title: str) -> None:
    """Tokens of a text, each on a background from white (specialists) to blue (generalist)."""
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.35 * (1 + len(pieces) // 12)))
    ax.axis("off")
    cmap = plt.get_cmap("Blues")
    x, y = 0.0, 1.0
    for piece, w in zip(pieces, weights):
        text = piece.replace("\n", "⏎").replace("$", r"\$") or "·"
        width = 0.012 * len(text) + 0.012
        if x + width > 1.0:
            x, y = 0.0, y - 0.3 / max(1, len(pieces) // 12)
        ax.text(x, y, text, fontsize=8, family="monospace", va="top", transform=ax.transAxes,
                bbox=dict(boxstyle="square,pad=0.1", fc=cmap(0.15 + 0.8 * float(w)), ec="none"))
        x += width
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_figures(run_dir: str, results: dict, records: list[dict], sim, data, n_tokens: int,
                write: bool = True, federation: int = 0) -> None:
    """The figures of federation `federation`'s run of `sim`. In a multi-process run every process
    calls this (user 0's params are gathered collectively); only the one with write=True (process
    0) draws and writes."""
    import jax.numpy as jnp

    from comigs_jax.federated.roles import merge
    from comigs_jax.model.lm import token_gate_weights

    g = sim.model_cfg.moe.n_generalists
    routing = sim.method.has_router and g > 0
    params0 = sim.user_params(0, federation) if routing else None  # a collective: every process takes part
    if not write:
        return
    users = [u["user"] for u in results["users"]]
    if records:
        loss_curves(os.path.join(run_dir, "loss_curves.png"), records, users)
    generalist_share_per_layer(os.path.join(run_dir, "generalist_share.png"), results, g)
    from comigs_jax.experiment.distribution import histogram_figure
    histogram_figure(os.path.join(run_dir, "test_ppl_histogram.png"), results["users"],
                     f"{results['method']}, seed {results['seed']}")
    if not routing:
        return
    # Token-level routing of user 0's model on the start of its test split, averaged over layers.
    tokens = np.asarray(data.test[data.indices.index(0)][: min(n_tokens, sim.tc.seq_len)], np.int32)
    import jax
    # Host copies of replicated arrays: this process computes alone, with no other process.
    local = jax.tree.map(np.asarray, merge(sim.base, params0))
    w = token_gate_weights(sim.model_cfg, local, jnp.asarray(tokens)[None], jnp.asarray(sim.masks[federation * sim.layout.models_per_federation]))
    share = np.asarray(w)[:, 0, :, :g].sum(-1).mean(0)  # [T]
    pieces = _decode_pieces(tokens, data)
    routing_picture(os.path.join(run_dir, "routing_tokens.png"), pieces, share,
                    f"{results['method']}, user {users[0]}: weight on the generalist (blue) per token")


def _decode_pieces(tokens, data) -> list[str]:
    if data.info.get("source") == "synthetic":
        return [str(int(t)) for t in tokens]
    from comigs_jax.model.hf import load_tokenizer
    tok = load_tokenizer(data.info.get("tokenizer", "gpt2"))
    return [tok.decode([int(t)]) for t in tokens]


def comparison_figure(workdir: str, table: dict) -> None:
    users = table["users"]
    methods = list(table["methods"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(users), 3.8))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        e = table["methods"][m]
        ci = [(0.0, 0.0) if c is None else (mu - c[0], c[1] - mu) for mu, c in zip(e["mean"], e["ci95"])]
        ax.bar(np.arange(len(users)) + j * width, e["mean"], width, yerr=np.asarray(ci).T, label=m, capsize=2)
    if "bayes_ppl" in table:
        for i, b in enumerate(table["bayes_ppl"]):
            ax.hlines(b, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="--",
                      label="Bayes-optimal" if i == 0 else None)
    ax.set_xticks(np.arange(len(users)) + 0.4 - width / 2, users)
    ax.set(ylabel="test perplexity", title="per-user test perplexity by method (bars: 95 % intervals over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "comparison.png"), dpi=110)
    plt.close(fig)
