"""Tiny models and data shared by the engine tests (milliseconds per step on a CPU), and the
tolerances the tests compare programs and result files with."""
import functools

import jax
import numpy as np
import pytest

from comigs_jax.federated.roles import split_base
from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import GPT2, init_params

VOCAB = 32

# Two programs of the same math (chunked vs all at once, vmap vs loop, stacked vs separate, sharded
# vs one device) sum in different orders, which a CPU or XLA version may change. In float32 the last
# bits differ and Adam, which divides a gradient by sqrt(v) + eps (eps 1e-8), turns a last-bit
# difference of a near-zero gradient into up to a whole step (lr): no float32 tolerance separates
# that from a bug. So those tests run their models in float64 (the `x64` fixture, tiny_cfg(dtype=
# "float64")), where the same bound is small: float64 sums of the <= 1e3 per-token gradient terms
# (each < 0.1 here) differ by <= 1e3 * 0.1 * 1.1e-16 ~ 1e-14, an update by <= lr * 1e-14 / eps =
# 2e-9 per step at lr 2e-3, <= 2e-8 over the <= 10 steps of these tests (seen: <= 1e-13). A bug
# (another user's rows, a wrong mask or seed) moves parameters by ~lr and metrics by >= 1e-4.
TOL64 = dict(rtol=1e-7, atol=1e-7)

F32_U = 2.0 ** -24  # float32's unit roundoff


def assert_mean_close(got, x, w, err_msg=""):
    """got [..., *x.shape[1:]] (broadcast) is the weighted mean over the leading axis of float32
    x [U, ...] with weights w [U], to float32 rounding whatever the summation order: the exact mean
    (float64) within (U + 2) u sum_i |w_i x_i| / sum_i w_i elementwise (Higham's bound for a sum of
    U products, plus the weights' normalisation; u = 2^-24). A fixed rtol fails where the mean
    nearly cancels; this bound does not, and a wrong weight or user moves the mean by O(|x|)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    w = w / w.sum()
    exact = np.tensordot(w, x, axes=1)
    bound = (len(w) + 2) * F32_U * np.tensordot(np.abs(w), np.abs(x), axes=1)
    err = np.abs(np.asarray(got, np.float64) - exact)
    assert np.all(err <= bound), f"{err_msg}: |got - mean| up to {err.max():.3g} > the float32 bound (max {bound.max():.3g})"


def assert_json_close(got, want, rtol: float, atol: float, skip=(), added=(), where="results"):
    """`got` is the JSON tree `want` (results.json, metrics lines): the same keys, but `skip` (the
    wall clock: compared nowhere) and `added` (keys `got` may hold beyond `want`: written by later
    code), lists of the same length, floats within max(rtol |want|, atol), everything else equal."""
    if isinstance(want, dict):
        extra = (set(got) ^ set(want)) - set(skip) - (set(got) & set(added))
        assert not extra, (where, sorted(extra))
        for k in want:
            if k not in skip:
                assert_json_close(got[k], want[k], rtol, atol, skip, added, f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_json_close(g, w, rtol, atol, skip, added, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rtol, abs=atol), (where, got, want)
    else:
        assert got == want, (where, got, want)


def random_like(tree, scale: float, seed: int):
    """Every leaf replaced by scale * N(0, 1) float32, drawn with NumPy: an eager jax.random call
    per leaf shape would be one XLA compile each (about half a second on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(np.shape(x))).astype(np.float32), tree)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens, mask=None):
    """GPT2(cfg).apply({"params": params}, tokens, mask), jitted: one compile per config instead of
    an op-by-op trace (seconds per call on CPU)."""
    return GPT2(cfg).apply({"params": params}, tokens, mask)


def tiny_cfg(n_experts=2, n_generalists=1, top_k=2, n_layer=1, dtype="float32"):
    """dtype "float64" (under jax.enable_x64) for tests that compare two programs of the same math."""
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=n_layer, n_head=2, dtype=dtype,
                      attn_lora=LoRAConfig(rank=2),
                      moe=MoEConfig(n_experts=n_experts, n_generalists=n_generalists, top_k=top_k,
                                    lora=LoRAConfig(rank=2)))


def tiny_base(cfg, seed=0):
    """A random frozen base whose tied embedding is large enough (N(0, 1), not GPT-2's N(0, 0.02))
    for its logits to leave uniform: with tiny random embeddings, LoRA alone cannot learn."""
    base = split_base(init_params(cfg.base, jax.random.key(seed)))[0]
    base["wte"]["embedding"] = base["wte"]["embedding"] * 50.0
    return base


def markov_users(n_users, n_tokens, seed=0, sharpness=4.0):
    """Each user: its own sparse first-order Markov chain over VOCAB tokens (learnable, distinct)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        logits = sharpness * rng.normal(size=(VOCAB, VOCAB))
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        x = np.zeros(n_tokens, np.uint16)
        u = rng.random(n_tokens)
        cdf = p.cumsum(1)
        for t in range(1, n_tokens):
            x[t] = min(np.searchsorted(cdf[x[t - 1]], u[t]), VOCAB - 1)
        out.append(x)
    return out


def as_if_killed_after_round(run_dir: str, lost_checkpoint: int = 4) -> str:
    """A finished run's folder as a kill left it: without its checkpoint `lost_checkpoint` (the one
    written after the last checkpoint it keeps) and without results.json / results.md."""
    import os
    import shutil
    shutil.rmtree(os.path.join(run_dir, "checkpoints", str(lost_checkpoint)))
    for f in ("results.json", "results.md"):
        os.remove(os.path.join(run_dir, f))
    return run_dir


def resume_one_more_round_each_federation_alone(first, again, n_rows: int, at_round: int, folder) -> None:
    """Each federation of `first` (after `at_round` rounds) checkpointed and read back into `again` (a
    new Simulation of the same config) as its own run does (experiment.program: its states and host
    state alone in a Layout of n_rows users on one device), then one more round and aggregation in
    `again`."""
    import os

    from comigs_jax.experiment.checkpoint import RunCheckpoints
    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.sharding import single_device_mesh
    alone = Layout(n_rows, single_device_mesh())
    cks = [RunCheckpoints(os.path.join(str(folder), f"f{f}")) for f in range(first.n_federations)]
    for f, ck in enumerate(cks):
        ck.save(at_round, first.federation_states(f, alone), {"host": first.host_states(alone)[f]})
    found = [ck.restore(at_round, again.federation_states(0, alone)) for ck in cks]
    again.set_federation_states([s for s, _ in found], alone)
    again.restore_host_states([meta["host"] for _, meta in found], alone)
    again.run_round()
    again.aggregate()


def assert_trees_equal(a, b) -> None:
    """Two pytrees of the same structure equal bit for bit, leaf by leaf (the path in the message)."""
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))
