"""Synthetic heterogeneous users with a known optimum.

The process of user u (vocabulary V):

* a hidden state z_t in {0 = general, 1 = specific} follows a two-state Markov chain with
  P(0 -> 1) = a_u = rate * share_u and P(1 -> 0) = b_u = rate * (1 - share_u); its stationary share
  of the specific state is share_u, and its mean segment lengths are 1/a_u and 1/b_u tokens.
  z_0 is drawn from the stationary distribution. rate = 1 removes the memory (z_t i.i.d.).
* x_0 is uniform over the vocabulary; for t >= 1, x_t ~ G[x_{t-1}] if z_t = 0 (the shared
  "general" first-order chain, identical for all users) and x_t ~ S_u[x_{t-1}] if z_t = 1 (the
  user's own "specific" chain).
* Each row of G (S_u) puts Dirichlet(concentration) weights on `general_branching`
  (`specific_branching`) distinct successors chosen at random. Weights are quantised to multiples
  of 2^-32, and those quantised probabilities are *the* process: sampling (an integer comparison of
  a uniform 32-bit draw with the cumulative thresholds) and the Bayes computation use the same
  numbers, so the reported optimum is exact.

Users differ through their specific chains and their shares (spaced linearly from
specific_share_min to specific_share_max). The general chain is seen by every user a
(1 - share_u) fraction of the time, so pooling users helps to learn it: a generalist expert has
something to share and a specialist something to keep.

**Three levels.** B, the *base chain*, is what a pretrained base (base="pretrain") is trained on
(`base_stream`); G, the federation's *shared* (general) chain; S_u, each user's own chain.
`synthetic.base_knows_shared` = k in [0, 1] sets how much of G the base knows: exactly round(k V)
rows of G, chosen at random, are B's rows; the others are drawn afresh (same branching and
concentration, their own generator). The known rows are nested as k grows (one permutation), and
k = 1 is G = B, the single general chain of before, bit for bit. B does not depend on k, so the
same base serves every k. The Bayes computation below uses G and S_u, quantised as before, so the
floor stays exact.

**Bayes-optimal perplexity.** The best possible next-token predictor knows G, S_u, a_u, b_u and
conditions on the whole past: p(x_t | x_<t) = sum_z p(z_t = z | x_<t) P_z[x_{t-1}, x_t]. With
f_t(z) = p(x_1..x_t, z_t = z | x_0), f_t = f_{t-1} M_t with M_t = T diag(P_0[x_{t-1}, x_t],
P_1[x_{t-1}, x_t]) and f_0 = pi (the forward algorithm). The prefix products M_1...M_t are computed
with a parallel (Hillis-Steele) scan over time in float64, each product kept as a matrix with max
entry 1 plus a log scale; log p(x_t | x_<t) = log L_t - log L_{t-1} with L_t = pi M_1...M_t 1.
The reported perplexity is exp(-mean_{t >= 1} log p(x_t | x_<t)) over the split's stream (the
first token, uniform, is not a prediction). A model that sees only a window of the past can only
do worse in expectation, so this is a floor for windowed evaluation too.

**Out-of-distribution targets.** `synthetic.target_share_shift` = d in [0, 1) draws the validation
and test splits from the user's *target* process: the same chains, its specific share moved to
share + d (1 - share); the training split keeps the share. The training data under-represent the
user's own chain, as a router trained on validation data can learn and one trained on training
data cannot. The Bayes floor of a split is computed under the process that drew it. d = 0: every
split from one process, as before.

Streams are seeded per (seed, user, split), so a user's data do not depend on which other users
are built.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
_Q = 2 ** 32  # probability quantum denominator


@dataclass
class Chain:
    """A first-order Markov chain with quantised rows: successor ids and 32-bit thresholds."""
    succ: np.ndarray  # [V, k] int32 successor token ids (distinct per row)
    thresholds: np.ndarray  # [V, k-1] uint32 cumulative thresholds (idx = #{thresholds <= u})
    probs: np.ndarray  # [V, k] float64 exact probabilities (differences of thresholds / 2^32)

    def dense(self) -> np.ndarray:
        V = self.succ.shape[0]
        P = np.zeros((V, V))
        np.put_along_axis(P, self.succ.astype(np.int64), self.probs, axis=1)
        return P


def make_chain(vocab: int, branching: int, concentration: float, rng: np.random.Generator) -> Chain:
    succ = np.argsort(rng.random((vocab, vocab)), axis=1)[:, :branching].astype(np.int32)
    w = rng.gamma(concentration, size=(vocab, branching))
    w = w / w.sum(axis=1, keepdims=True)
    cum = np.rint(np.cumsum(w, axis=1)[:, :-1] * _Q)
    cum = np.clip(np.maximum.accumulate(cum, axis=1), 0, _Q - 1).astype(np.uint64)
    edges = np.concatenate([np.zeros((vocab, 1), np.uint64), cum, np.full((vocab, 1), _Q, np.uint64)], axis=1)
    probs = np.diff(edges.astype(np.float64), axis=1) / _Q
    return Chain(succ=succ, thresholds=cum.astype(np.uint32), probs=probs)


@dataclass
class UserProcess:
    general: Chain
    specific: Chain
    share: float  # stationary P(z = specific)
    a: float  # P(general -> specific)
    b: float  # P(specific -> general)

    @property
    def transition(self) -> np.ndarray:
        return np.array([[1 - self.a, self.a], [self.b, 1 - self.b]])

    @property
    def stationary(self) -> np.ndarray:
        return np.array([1 - self.share, self.share])


def user_shares(syn, n_users: int) -> np.ndarray:
    if n_users == 1:
        return np.array([(syn.specific_share_min + syn.specific_share_max) / 2])
    return np.linspace(syn.specific_share_min, syn.specific_share_max, n_users)


@functools.lru_cache(maxsize=8)
def _base_chain(vocab, branching, concentration, seed) -> Chain:
    return make_chain(vocab, branching, concentration, np.random.default_rng([seed, 7001]))


@functools.lru_cache(maxsize=8)
def _shared_chain(vocab, branching, concentration, seed, knows) -> Chain:
    base = _base_chain(vocab, branching, concentration, seed)
    if knows == 1.0:
        return base
    rng = np.random.default_rng([seed, 7005])
    fresh = make_chain(vocab, branching, concentration, rng)
    known = np.zeros(vocab, bool)
    known[rng.permutation(vocab)[:int(round(knows * vocab))]] = True
    pick = lambda b, f: np.where(known[:, None], b, f)
    return Chain(succ=pick(base.succ, fresh.succ), thresholds=pick(base.thresholds, fresh.thresholds),
                 probs=pick(base.probs, fresh.probs))


def base_chain(data_cfg) -> Chain:
    """B: the chain a pretrained base is trained on (independent of base_knows_shared)."""
    s = data_cfg.synthetic
    return _base_chain(s.vocab_size, s.general_branching, float(s.concentration), int(data_cfg.seed))


def general_chain(data_cfg) -> Chain:
    """G: the federation's shared chain, B's rows where the base knows them (base_knows_shared)."""
    s = data_cfg.synthetic
    return _shared_chain(s.vocab_size, s.general_branching, float(s.concentration), int(data_cfg.seed),
                         float(s.get("base_knows_shared", 1.0)))


shared_chain = general_chain


def user_process(data_cfg, user: int) -> UserProcess:
    """The process of user `user`'s training split (and of every split without target_share_shift)."""
    s = data_cfg.synthetic
    share = float(user_shares(s, data_cfg.n_users)[user])
    spec = make_chain(s.vocab_size, s.specific_branching, s.concentration,
                      np.random.default_rng([int(data_cfg.seed), 7002, user]))
    return UserProcess(general=general_chain(data_cfg), specific=spec, share=share,
                       a=s.switch_rate * share, b=s.switch_rate * (1 - share))


def target_process(data_cfg, proc: UserProcess) -> UserProcess:
    """The process of the validation and test splits: the user's specific share moved towards 1 by
    synthetic.target_share_shift (d: share + d (1 - share)); the same chains. d = 0: `proc` itself."""
    s = data_cfg.synthetic
    d = float(s.get("target_share_shift", 0.0))
    if d == 0.0:
        return proc
    share = proc.share + d * (1.0 - proc.share)
    return dataclasses.replace(proc, share=share, a=s.switch_rate * share, b=s.switch_rate * (1 - share))


# ----------------------------------------------------------------------------- sampling
def sample_hidden(n: int, a: float, b: float, share: float, rng: np.random.Generator) -> np.ndarray:
    """z_0..z_{n-1} of the two-state chain, by alternating geometric run lengths (exact)."""
    state = int(rng.random() < share)
    leave = np.array([a, b])  # probability of leaving state 0 / 1 at each step
    parts, total = [], 0
    while total < n:
        m = 1024
        states = (state + np.arange(m)) % 2
        lengths = np.full(m, n, np.int64)
        ok = leave[states] > 0
        lengths[ok] = rng.geometric(leave[states][ok])
        cum = np.cumsum(lengths)
        stop = int(np.searchsorted(cum, n - total))  # first run that reaches n
        if stop < m:
            lengths = lengths[:stop + 1].copy()
            lengths[-1] -= cum[stop] - (n - total)
            states = states[:stop + 1]
        parts.append(np.repeat(states.astype(np.int8), lengths))
        total += int(lengths.sum())
        state = int(states[-1] + 1) % 2
    return np.concatenate(parts)[:n]


@functools.lru_cache(maxsize=None)
def _scan_sampler():
    import jax
    import jax.numpy as jnp

    def one(succ, thr, z, u, x0):  # succ [2, V, k], thr [2, V, k-1], z [n], u [n]
        def step(x, inp):
            zz, uu = inp
            idx = jnp.sum(thr[zz, x] <= uu)
            x = succ[zz, x, idx]
            return x, x
        return jax.lax.scan(step, x0, (z, u))[1]

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0)))


def _pad_pair(c0: Chain, c1: Chain):
    """Stack two chains with possibly different branching into [2, V, k] arrays."""
    k = max(c0.succ.shape[1], c1.succ.shape[1])
    succ = np.zeros((2, c0.succ.shape[0], k), np.int32)
    thr = np.full((2, c0.succ.shape[0], max(k - 1, 1)), np.uint32(_Q - 1), np.uint32)
    for i, c in enumerate((c0, c1)):
        succ[i, :, :c.succ.shape[1]] = c.succ
        if c.thresholds.shape[1]:
            thr[i, :, :c.thresholds.shape[1]] = c.thresholds
    # an all-ones threshold counts only for u == 2^32 - 1 with k_i < k: map such an index back
    # to the last real successor by repeating it in the padding
    for i, c in enumerate((c0, c1)):
        succ[i, :, c.succ.shape[1]:] = c.succ[:, -1:]
    return succ, thr


def sample_streams(procs: list[UserProcess], n: int, seeds: list[list[int]]) -> list[np.ndarray]:
    """One stream of n tokens per (process, seed), sampled exactly from the process."""
    if not procs:  # a process of a multi-host run whose devices hold no real user
        return []
    import jax
    import jax.numpy as jnp

    zs, us, x0s, succs, thrs = [], [], [], [], []
    for proc, sd in zip(procs, seeds):
        rng = np.random.default_rng(sd)
        x0s.append(int(rng.integers(proc.general.succ.shape[0])))
        zs.append(sample_hidden(n, proc.a, proc.b, proc.share, rng))
        us.append(rng.integers(0, _Q, size=n, dtype=np.uint64).astype(np.uint32))
        s, t = _pad_pair(proc.general, proc.specific)
        succs.append(s)
        thrs.append(t)
    if n == 1:
        return [np.array([x], np.int64) for x in x0s]
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's own
        xs = _scan_sampler()(jnp.asarray(np.stack(succs)), jnp.asarray(np.stack(thrs)),
                             jnp.asarray(np.stack(zs)[:, 1:].astype(np.int32)), jnp.asarray(np.stack(us)[:, 1:]),
                             jnp.asarray(np.array(x0s, np.int32)))
        xs = np.asarray(xs)
    return [np.concatenate([[x0], x]).astype(np.int64) for x0, x in zip(x0s, xs)]


# ----------------------------------------------------------------------------- Bayes
def _matmul2(a, b):
    """Batched 2x2 products of (m00, m01, m10, m11) tuples."""
    a00, a01, a10, a11 = a
    b00, b01, b10, b11 = b
    return (a00 * b00 + a01 * b10, a00 * b01 + a01 * b11, a10 * b00 + a11 * b10, a10 * b01 + a11 * b11)


def bayes_logprobs(x: np.ndarray, P0: np.ndarray, P1: np.ndarray, T: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """log p(x_t | x_<t) for t = 1..n-1 under the switching process (forward algorithm, float64)."""
    x = np.asarray(x, np.int64)
    if len(x) < 2:
        return np.zeros(0)
    e0 = P0[x[:-1], x[1:]]
    e1 = P1[x[:-1], x[1:]]
    m = [T[0, 0] * e0, T[0, 1] * e1, T[1, 0] * e0, T[1, 1] * e1]  # M_t = T diag(e0, e1)
    mx = np.maximum.reduce([np.abs(v) for v in m])
    if np.any(mx <= 0):
        raise ValueError("the stream has probability 0 under the process")
    m = [v / mx for v in m]
    s = np.log(mx)
    n, k = len(e0), 1
    while k < n:  # inclusive prefix products, Hillis-Steele
        c = _matmul2([v[:-k] for v in m], [v[k:] for v in m])
        cm = np.maximum.reduce([np.abs(v) for v in c])
        cs = s[:-k] + s[k:] + np.log(cm)
        m = [np.concatenate([v[:k], cv / cm]) for v, cv in zip(m, c)]
        s = np.concatenate([s[:k], cs])
        k *= 2
    logL = s + np.log(pi[0] * (m[0] + m[1]) + pi[1] * (m[2] + m[3]))
    return np.diff(np.concatenate([[0.0], logL]))


def bayes_ppl(x: np.ndarray, proc: UserProcess) -> float:
    lp = bayes_logprobs(x, proc.general.dense(), proc.specific.dense(), proc.transition, proc.stationary)
    return float(np.exp(-lp.mean()))


# ----------------------------------------------------------------------------- public
def token_dtype(data_cfg, vocab: int):
    if data_cfg.dtype == "uint32" or (data_cfg.dtype == "auto" and vocab > 65536):
        return np.uint32
    return np.uint16


def build_users(data_cfg, user_indices: list[int], splits=("train", "valid", "test"),
                bayes_splits=("valid", "test")) -> tuple[dict, dict]:
    """{split: [array per user]}, info (processes' shares, switch probabilities, Bayes ppl)."""
    dt = token_dtype(data_cfg, data_cfg.synthetic.vocab_size)
    procs = {u: user_process(data_cfg, u) for u in user_indices}
    targets = {u: target_process(data_cfg, procs[u]) for u in user_indices}
    out, info = {}, {"base_knows_shared": float(data_cfg.synthetic.get("base_knows_shared", 1.0)),
                     "specific_share": [procs[u].share for u in user_indices],
                     "switch_to_specific": [procs[u].a for u in user_indices],
                     "switch_to_general": [procs[u].b for u in user_indices]}
    if any(targets[u] is not procs[u] for u in user_indices):
        info["target_specific_share"] = [targets[u].share for u in user_indices]  # valid and test
    for split in splits:
        of = procs if split == "train" else targets
        n = int(data_cfg[f"{split}_tokens"])
        seeds = [[int(data_cfg.seed), 7003, u, _SPLIT_IDS[split]] for u in user_indices]
        xs = sample_streams([of[u] for u in user_indices], n, seeds)
        out[split] = [x.astype(dt) for x in xs]
        if split in bayes_splits:
            info[f"bayes_ppl_{split}"] = [bayes_ppl(x, of[u]) for x, u in zip(xs, user_indices)]
    return out, info


def _chain_stream(data_cfg, chain: Chain, n_tokens: int, seed: int) -> np.ndarray:
    proc = UserProcess(general=chain, specific=chain, share=0.0, a=0.0, b=1.0)
    x = sample_streams([proc], int(n_tokens), [[int(data_cfg.seed), 7004, int(seed)]])[0]
    return x.astype(token_dtype(data_cfg, data_cfg.synthetic.vocab_size))


def base_stream(data_cfg, n_tokens: int, seed: int = 0) -> np.ndarray:
    """n_tokens from the base chain B alone: what a small base model is pretrained on."""
    return _chain_stream(data_cfg, base_chain(data_cfg), n_tokens, seed)


def general_stream(data_cfg, n_tokens: int, seed: int = 0) -> np.ndarray:
    """n_tokens from the shared (general) chain G alone (equal to base_stream when base_knows_shared = 1)."""
    return _chain_stream(data_cfg, general_chain(data_cfg), n_tokens, seed)


def general_entropy_rate(data_cfg) -> float:
    """Entropy rate (nats/token) of the general chain under its stationary distribution."""
    P = general_chain(data_cfg).dense()
    w, v = np.linalg.eig(P.T)
    st = np.real(v[:, np.argmin(np.abs(w - 1))])
    st = st / st.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(P > 0, P * np.log(P), 0.0), axis=1)
    return float(st @ h)
