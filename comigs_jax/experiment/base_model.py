"""The frozen base of a run: a Hugging Face GPT-2, or (base="pretrain") a small GPT-2 trained
here on the synthetic general chain, cached in HF format and loaded back through the same loader."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from comigs_jax.data import general_stream
from comigs_jax.errors import BaseModelError
from comigs_jax.model.config import GPT2Config
from comigs_jax.model.hf import CheckpointError, load_gpt2, save_gpt2
from comigs_jax.train.pretrain import pretrain


def pretrained_base_dir(cfg) -> str:
    """Where base="pretrain" caches its base: keyed on everything that changes it."""
    p = cfg.pretrain
    key = json.dumps({"pretrain": p.to_dict(), "synthetic": cfg.data.synthetic.to_dict(),
                      "seq_len": cfg.train.seq_len, "data_seed": cfg.data.seed, "v": 1}, sort_keys=True)
    return os.path.join(os.path.expanduser(cfg.data.cache_dir), "bases",
                        "pretrained-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def load_base(cfg, vocab_size: int, log=print) -> tuple[GPT2Config, dict]:
    """(GPT2Config, base params); BaseModelError (one line) when the base cannot be loaded. A
    damaged cached base is a cache: reported and pretrained again, never a dead end."""
    if cfg.base != "pretrain":
        try:
            return load_gpt2(cfg.base)
        except CheckpointError as e:
            raise BaseModelError(str(e).strip().splitlines()[0]) from e
    p = cfg.pretrain
    ckpt = pretrained_base_dir(cfg)
    damaged = False
    if os.path.exists(ckpt):
        try:
            return load_gpt2(ckpt)
        except CheckpointError as e:
            log(f"warning: the cached base cannot be loaded ({str(e).splitlines()[0]}); pretraining it again")
            damaged = True
    base_cfg = GPT2Config(vocab_size=vocab_size, n_positions=cfg.train.seq_len, n_embd=p.n_embd,
                          n_layer=p.n_layer, n_head=p.n_head)
    stream = general_stream(cfg.data, p.tokens, seed=cfg.data.seed)
    log(f"pretraining a {p.n_layer}-layer, {p.n_embd}-wide GPT-2 base on {len(stream):,} tokens of the "
        f"general chain ({p.steps} steps) -> {ckpt}")
    t0 = time.time()
    params, hist = pretrain(base_cfg, np.asarray(stream), steps=p.steps, batch_size=p.batch_size,
                            seq_len=cfg.train.seq_len, lr=p.lr, seed=cfg.data.seed)
    log(f"  pretraining loss {hist[0]:.3f} -> {hist[-1]:.3f} in {time.time() - t0:.1f} s")
    tmp = f"{ckpt}.tmp{os.getpid()}"  # one writer per folder; the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    save_gpt2(params, base_cfg, tmp)
    loaded = load_gpt2(tmp)  # through the same loader as real GPT-2 (a copy in memory)
    if damaged:
        shutil.rmtree(ckpt, ignore_errors=True)
    try:
        os.replace(tmp, ckpt)
    except OSError:  # another process (same seed, same base) got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return loaded
