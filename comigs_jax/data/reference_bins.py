"""The reference runner's pre-tokenised users: ``<dir>/<U>/{train,valid,test}_{i}.bin``.

Each file is user i's split as raw token ids with no header: ``uint16`` (GPT-2; ``data.dtype``
"auto" or "uint16") or ``uint32`` (Llama; ``data.dtype="uint32"``), little-endian, exactly as the
reference's ``np.memmap(..., dtype=np.uint16)`` reads them (method.md §6). The arrays are used as
they are: no re-splitting, no re-tokenisation, no cache. The tokenizer (``data.tokenizer``) only
gives the vocabulary the ids are checked against and decodes text for the routing pictures.

A missing file, a byte count that is not a whole number of tokens, a split shorter than one
window, or an id outside the vocabulary is a `ReferenceBinsError` naming the file.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from comigs_jax.data.config import SPLITS
from comigs_jax.data.sources import DataSourceError

BIN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ReferenceBinsError(DataSourceError, ValueError):
    """A reference .bin file is missing or malformed (the message names the file)."""


def bin_dtype(data_cfg, vocab_size: int) -> np.dtype:
    """The files' token dtype: uint16 while the vocabulary fits in it, uint32 otherwise ("auto"), or
    data.dtype as given; uint16 for a vocabulary of more than 65,536 ids is a one-line error."""
    if data_cfg.dtype == "auto":
        return BIN_DTYPES["uint16" if vocab_size <= 65536 else "uint32"]
    if data_cfg.dtype == "uint16" and vocab_size > 65536:
        raise ReferenceBinsError(f"data.dtype='uint16' cannot hold the {vocab_size} ids of data.tokenizer="
                                 f"{data_cfg.tokenizer!r}: 'uint32' or 'auto'")
    return BIN_DTYPES[data_cfg.dtype]


def user_dir(data_cfg) -> str:
    return os.path.join(os.path.expanduser(data_cfg.dir), str(int(data_cfg.n_users)))


def bin_path(data_cfg, split: str, user: int) -> str:
    return os.path.join(user_dir(data_cfg), f"{split}_{user}.bin")


def tokenizer_vocab(name: str) -> tuple[int, int | None]:
    """(vocabulary size, eos id) of data.tokenizer; the bundled GPT-2 BPE without loading it."""
    if name in ("", "gpt2"):
        from comigs_jax.model.hf import GPT2_VOCAB_SIZE

        return GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE - 1
    from comigs_jax.data import tokens

    return tokens.tokenizer_info(tokens.get_tokenizer(name))


def read_bin(path: str, dtype: np.dtype, vocab_size: int, min_tokens: int, tokenizer: str = "gpt2") -> np.ndarray:
    """One split file -> 1-D array (native-endian), with every check naming the file."""
    if not os.path.isfile(path):
        raise ReferenceBinsError(f"{path}: missing (the reference layout is <data.dir>/<n_users>/"
                                 f"{{train,valid,test}}_{{i}}.bin, i = 0..n_users-1)")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        other = "uint32" if dtype.itemsize == 2 else "uint16"
        raise ReferenceBinsError(f"{path}: {size} bytes is not a whole number of {dtype.itemsize}-byte "
                                 f"{np.dtype(dtype).name} tokens (truncated file, or written as {other}? "
                                 f"set data.dtype)")
    a = np.fromfile(path, dtype=dtype).astype(dtype.newbyteorder("="))
    if len(a) < min_tokens:
        raise ReferenceBinsError(f"{path}: {len(a)} tokens, fewer than one window "
                                 f"(min_tokens={min_tokens} = seq_len + 1)")
    top = int(a.max())
    if top >= vocab_size:
        pos = int(np.argmax(a >= vocab_size))
        raise ReferenceBinsError(f"{path}: token id {top} (first out-of-range id at position {pos}) is outside "
                                 f"the vocabulary of {vocab_size} ids of data.tokenizer={tokenizer!r} (another tokenizer? "
                                 f"set data.tokenizer; uint32 ids? set data.dtype='uint32')")
    return a


def load_users(data_cfg, idx: list[int]) -> tuple[dict, int, int | None, dict]:
    """({split: [array per user in idx]}, vocab size, eos id, info) for the requested users."""
    vocab, eos = tokenizer_vocab(data_cfg.tokenizer)
    dtype = bin_dtype(data_cfg, vocab)
    arrays = {s: [] for s in SPLITS}
    files = {s: [] for s in SPLITS}
    digests = []
    for i in idx:
        d = {}
        for s in SPLITS:
            path = bin_path(data_cfg, s, i)
            a = read_bin(path, dtype, vocab, int(data_cfg.min_tokens), data_cfg.tokenizer)
            arrays[s].append(a)
            files[s].append(os.path.abspath(path))
            d[s] = hashlib.sha256(a.astype(dtype).tobytes()).hexdigest()
        digests.append(d)
    info = {"source": "reference_bins", "partition": "given", "dir": os.path.abspath(user_dir(data_cfg)),
            "files": files, "file_dtype": np.dtype(dtype).name, "user_indices": idx,
            "tokens": [{s: int(len(arrays[s][k])) for s in SPLITS} for k in range(len(idx))],
            "sha256": digests}
    return arrays, vocab, eos, info


def check_token_ids(data, vocab_size: int) -> None:
    """Every token id of every user split is < vocab_size (the model's); else one line naming the
    file (reference_bins) or the user and split."""
    files = data.info.get("files") if data.info.get("source") == "reference_bins" else None
    for s in SPLITS:
        for k, a in enumerate(data.split(s)):
            if len(a) and int(a.max()) >= vocab_size:
                where = files[s][k] if files else f"user {data.indices[k]} ({data.users[k]}), {s} split"
                raise ReferenceBinsError(f"{where}: token id {int(a.max())} is outside the model's vocabulary "
                                         f"of {vocab_size} ids")
