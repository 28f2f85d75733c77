"""A token stream from a folder of text: what base="pretrain" trains on with pretrain.text.

The folder's .jsonl/.json files (one document per line, field "text") and other files (one
document each) are read in path order, the documents put in a seeded order, tokenised (each
followed by end-of-text) and concatenated until `n_tokens`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np

from comigs_jax.data import tokens
from comigs_jax.data.sources import DataSourceError

_JSON = (".json", ".jsonl")


def text_files(folder: str) -> list[str]:
    root = os.path.expanduser(folder)
    return sorted(f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                  if os.path.isfile(f) and not os.path.basename(f).startswith("."))


def read_documents(folder: str) -> list[str]:
    docs: list[str] = []
    for f in text_files(folder):
        with open(f, encoding="utf-8") as fh:
            if f.lower().endswith(_JSON):
                docs += [json.loads(line)["text"] for line in fh if line.strip()]
            else:
                docs.append(fh.read())
    return [d for d in docs if d.strip()]


def fingerprint(folder: str) -> str:
    """What identifies the folder's text in cache keys: its files' names, sizes and mtimes."""
    root = os.path.abspath(os.path.expanduser(folder))
    st = [(os.path.relpath(f, root), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in text_files(root)]
    return f"{root}:{hashlib.sha256(repr(st).encode()).hexdigest()[:16]}"


def text_stream(folder: str, tokenizer: str, n_tokens: int, seed: int = 0, batch: int = 512) -> np.ndarray:
    """[<= n_tokens] int32 token ids of the folder's documents (all of them when they hold fewer)."""
    docs = read_documents(folder)
    if not docs:
        raise DataSourceError(f"pretrain.text={folder!r}: no documents (.jsonl lines with a 'text' field or text files)")
    tok = tokens.get_tokenizer(tokenizer)
    _, eos = tokens.tokenizer_info(tok)
    tail = [eos] if eos is not None else []
    order = np.random.default_rng([int(seed), 7001]).permutation(len(docs))
    out, have = [], 0
    for k in range(0, len(order), batch):
        for ids in tokens.encode_batch(tok, [docs[j] for j in order[k:k + batch]]):
            out.append(np.asarray(list(ids) + tail, np.int32))
            have += len(out[-1])
        if have >= n_tokens:
            break
    return np.concatenate(out)[:n_tokens]
