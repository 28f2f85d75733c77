"""Per-user token arrays from a config: partition, read, split by document, tokenise, cache.

How real-text users are built (every step deterministic for a seed):

1. The partition (`partition.make_partition`) gives, for all U users, the tokens each split needs
   from each category. Within one (category, split) pool, users are served in user order.
2. Documents of a category are read in the source's seeded order. Each document goes to exactly
   one split (so splits are disjoint by document): the split whose share of the category's
   characters so far, relative to its total token demand over all users, is lowest (ties: train,
   valid, test). Splits thus fill in proportion and little text is wasted; the rule looks only at
   the document stream and the full partition, never at which users are being built.
3. Documents are tokenised in batches, each followed by the end-of-text token (when the tokenizer
   has one), and dealt whole to the pool's current user; the document that completes a user's
   share is cut there (its last kept token replaced by end-of-text) and its remainder dropped,
   so users never share a document and every segment ends with end-of-text.
4. Reading stops once every requested user's share is filled.

User i's arrays depend only on the configuration, not on which other users are requested (the
shares of users before i are dealt even when they are not kept). Each built user is written to
its own cache file under `cache_dir/<source>/<key[:16]>/`, keyed on everything that changes the
tokens: source identity (ids, local files' sizes and mtimes), categories, partition and its
parameters, U, split sizes, tokenizer, seed, shuffle buffer and row limit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from comigs_jax.data import partition as partition_lib
from comigs_jax.data import presplit as presplit_lib
from comigs_jax.data import reference_bins, sources, synthetic, tokens
from comigs_jax.data.config import train_shares_of, SPLITS, resolve_categories, validate_data_config


class InsufficientDataError(ValueError):
    """A user split is smaller than requested (source exhausted) or than one window."""


@dataclass
class UserData:
    train: list  # one 1-D uint16/uint32 token array per user
    valid: list
    test: list
    users: list  # user names (category, language, mixture)
    vocab_size: int
    eos_id: Optional[int]
    info: dict = field(default_factory=dict)
    indices: list = field(default_factory=list)  # global user index of each entry

    def split(self, name: str) -> list:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def _dtype(data_cfg, vocab: int):
    return synthetic.token_dtype(data_cfg, vocab)


def _check_indices(data_cfg, user_indices) -> list[int]:
    U = int(data_cfg.n_users)
    if user_indices is None:
        return list(range(U))
    idx = [int(i) for i in user_indices]
    bad = [i for i in idx if not 0 <= i < U]
    if bad or len(set(idx)) != len(idx):
        raise ValueError(f"user_indices={list(user_indices)!r}: need distinct indices in [0, n_users={U})")
    return idx


def _check_min_tokens(data_cfg, idx, names, arrays):
    m = int(data_cfg.min_tokens)
    for s in SPLITS:
        for i, name, a in zip(idx, names, arrays[s]):
            if len(a) < m:
                raise InsufficientDataError(
                    f"user {i} ({name}): {s} split has {len(a)} tokens, fewer than one window "
                    f"(min_tokens={m} = seq_len + 1; requested {s}_tokens={data_cfg[f'{s}_tokens']})")


def load_user_data(data_cfg, user_indices: Optional[Sequence[int]] = None) -> UserData:
    """Train / valid / test token arrays of the requested users (all users by default); with
    data.train_shares, each user's training split cut to its share (its first tokens)."""
    data = _load_user_data(data_cfg, user_indices)
    shares = train_shares_of(data_cfg)
    if shares is not None:
        m = int(data_cfg.min_tokens)
        data.train = [a[:max(m, int(len(a) * shares[i]))] for i, a in zip(data.indices, data.train)]
        data.info["train_shares"] = [shares[i] for i in data.indices]
    return data


def _load_user_data(data_cfg, user_indices: Optional[Sequence[int]] = None) -> UserData:
    validate_data_config(data_cfg)
    idx = _check_indices(data_cfg, user_indices)
    if data_cfg.source == "synthetic":
        arrays, info = synthetic.build_users(data_cfg, idx)
        names = [f"user{i}" for i in idx]
        _check_min_tokens(data_cfg, idx, names, arrays)
        info.update(source="synthetic", partition="specific", user_indices=idx)
        return UserData(arrays["train"], arrays["valid"], arrays["test"], names,
                        int(data_cfg.synthetic.vocab_size), None, info, idx)

    if data_cfg.source == "reference_bins":
        arrays, vocab, eos, info = reference_bins.load_users(data_cfg, idx)
        return UserData(arrays["train"], arrays["valid"], arrays["test"], [f"user{i}" for i in idx],
                        vocab, eos, info, idx)

    cats = resolve_categories(data_cfg)
    presplit = presplit_lib.presplit_categories(data_cfg, cats) if data_cfg.source == "text_files" else False
    if presplit:
        presplit_lib.check_partition(data_cfg, cats)
    users = partition_lib.make_partition(data_cfg, cats)
    key = tokens.cache_key({
        "source": sources.source_fingerprint(data_cfg, cats), "categories": cats,
        "partition": {k: data_cfg[k] for k in ("partition", "mixed_share", "dirichlet_alpha", "ood_shift",
                                               "ood_target_share")},
        "n_users": int(data_cfg.n_users), "sizes": [int(data_cfg[f"{s}_tokens"]) for s in SPLITS],
        "tokenizer": tokens.tokenizer_fingerprint(data_cfg.tokenizer), "dtype": data_cfg.dtype,
        "seed": int(data_cfg.seed), "allow_fewer_tokens": bool(data_cfg.allow_fewer_tokens),
        **({"presplit": True} if presplit else {}),
    })
    cache_root = os.path.join(os.path.expanduser(data_cfg.cache_dir), data_cfg.source, key[:16])
    paths = {i: os.path.join(cache_root, f"user{i:05d}.tokens") for i in idx}
    got: dict = {}
    if data_cfg.use_cache:
        for i in idx:
            r = tokens.read_user_cache(paths[i], key)
            if r is not None:
                got[i] = r
    hits = sorted(got)
    missing = [i for i in idx if i not in got]
    if missing:
        build = presplit_lib.build_users if presplit else _build
        built, vocab, eos = build(data_cfg, cats, users, missing)
        for i in missing:
            header = {"vocab_size": vocab, "eos_id": eos, "name": users[i].name}
            if data_cfg.use_cache:
                tokens.write_user_cache(paths[i], key, i, users[i].name, built[i], vocab, eos,
                                        extra={"parts": users[i].parts})
            got[i] = (header, built[i])
    if idx:
        vocab, eos = int(got[idx[0]][0]["vocab_size"]), got[idx[0]][0]["eos_id"]
    else:  # no user asked for (a process of a multi-host run that holds only padding): the tokenizer's
        vocab, eos = tokens.tokenizer_info(tokens.get_tokenizer(data_cfg.tokenizer))
    arrays = {s: [got[i][1][s] for i in idx] for s in SPLITS}
    names = [users[i].name for i in idx]
    _check_min_tokens(data_cfg, idx, names, arrays)
    info = {"source": data_cfg.source, "partition": data_cfg.partition, "categories": cats,
            "parts": [users[i].parts for i in idx], "user_indices": idx, "cache_key": key,
            "cache_dir": cache_root if data_cfg.use_cache else None, "cache_hits": hits,
            "tokens": [{s: int(len(got[i][1][s])) for s in SPLITS} for i in idx]}
    if presplit:
        info["partition"] = "given"
        info["files"] = {s: [presplit_lib.split_file(data_cfg, users[i].name, s) for i in idx] for s in SPLITS}
    return UserData(arrays["train"], arrays["valid"], arrays["test"], names, vocab, eos, info, idx)


class _Pool:
    """One (category, split) pool: users served in order, whole documents, cut at each share."""

    def __init__(self, queue, wanted):
        self.queue = [(u, n) for u, n in queue if n > 0]
        self.wanted = wanted
        pos = [k for k, (u, _) in enumerate(self.queue) if u in wanted]
        self.last = pos[-1] if pos else -1
        self.pos, self.fill = 0, 0
        self.parts: dict = {u: [] for u, _ in self.queue if u in wanted}
        self.got: dict = {u: 0 for u, _ in self.queue if u in wanted}

    @property
    def done(self) -> bool:
        return self.pos > self.last

    def add(self, doc: np.ndarray, eos: Optional[int]) -> int:
        """Deal one document; returns the number of tokens kept for wanted users."""
        if self.done:
            return 0
        user, need = self.queue[self.pos]
        take = doc[:need - self.fill]
        if len(take) < len(doc) and eos is not None:  # a cut document still ends with end-of-text
            take = take.copy()
            take[-1] = eos
        self.fill += len(take)
        kept = 0
        if user in self.wanted:
            self.parts[user].append(take)
            self.got[user] += len(take)
            kept = len(take)
        if self.fill >= need:
            self.pos, self.fill = self.pos + 1, 0
        return kept


def _build(data_cfg, cats, users, wanted: list[int]):
    from tqdm.auto import tqdm

    sources.preflight(data_cfg, cats)  # an unreachable hub fails before the tokenizer loads
    tok = tokens.get_tokenizer(data_cfg.tokenizer)
    vocab, eos = tokens.tokenizer_info(tok)
    dt = _dtype(data_cfg, vocab)
    if np.iinfo(dt).max < vocab - 1:
        raise ValueError(f"data.dtype={data_cfg.dtype!r} is not allowed: vocabulary of {vocab} needs uint32 or auto")
    wanted_set = set(wanted)
    demands = partition_lib.pool_demands(users)
    pools = {cs: _Pool(q, wanted_set) for cs, q in demands.items()}
    demand, progress = {}, {}
    for c in cats:
        tot = np.array([sum(n for _, n in demands.get((c, s), [])) for s in SPLITS], np.float64)
        if tot.sum() > 0:
            demand[c] = np.where(tot > 0, tot, np.nan)
            progress[c] = np.zeros(len(SPLITS))
    needed = {c for (c, s), p in pools.items() if not p.done}
    total = sum(n for i in wanted for parts in users[i].parts.values() for _, n in parts)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"tokenising {data_cfg.source}",
               disable=not data_cfg.progress or None)
    batch: list = []
    eos_arr = np.array([eos] if eos is not None else [], np.int64)

    def flush():
        ids = tokens.encode_batch(tok, [t for _, _, t in batch])
        for (c, s, _), doc in zip(batch, ids):
            pool = pools[(c, s)]
            if pool.done:
                continue
            bar.update(pool.add(np.concatenate([np.asarray(doc, np.int64), eos_arr]), eos))
            if pool.done and all(pools[(c, t)].done for t in SPLITS if (c, t) in pools):
                needed.discard(c)
        batch.clear()

    try:
        for c, text in sources.iter_documents(data_cfg, cats, needed):
            if c not in demand or not text or not text.strip():
                continue
            k = int(np.nanargmin(progress[c] / demand[c]))
            progress[c][k] += len(text)
            s = SPLITS[k]
            if pools[(c, s)].done:
                continue
            batch.append((c, s, text))
            if len(batch) >= data_cfg.tokenize_batch:
                flush()
                if not needed:
                    break
        if batch:
            flush()
    finally:
        bar.close()

    out = {}
    for i in wanted:
        arrays = {}
        for s in SPLITS:
            segs = []
            for c, n in users[i].parts[s]:
                pool = pools[(c, s)]
                if pool.got[i] < n and not data_cfg.allow_fewer_tokens:
                    raise InsufficientDataError(
                        f"user {i} ({users[i].name}): {s} split needs {n} tokens of {c!r} but the source "
                        f"provided only {pool.got[i]} after users before it took theirs "
                        f"({s}_tokens={data_cfg[f'{s}_tokens']}); lower data.{s}_tokens, add data "
                        f"(max_documents={data_cfg.max_documents}), or set data.allow_fewer_tokens=True")
                segs.extend(pool.parts[i])
            arrays[s] = np.concatenate(segs).astype(dt) if segs else np.zeros(0, dt)
        out[i] = arrays
    return out, vocab, eos
