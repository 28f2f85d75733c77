"""Tokenisation and the on-disk token cache.

Cache files hold one user's three splits: an 8-byte magic, an 8-byte little-endian header length,
a JSON header (format version, cache key, user, dtype, split lengths, CRC-32 of the payload,
vocabulary size, eos id) and the raw token payload (train | valid | test). A file whose magic,
version, key, size or checksum does not match is treated as absent and rebuilt (a truncated copy,
an older format, another configuration). Files are written to a temporary name in the same folder
and renamed with `os.replace`, so readers never see partial files.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
import zlib
from typing import Optional

import numpy as np

CACHE_MAGIC = b"CMGSTOK\x00"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=4)
def get_tokenizer(name: str):
    from comigs_jax.model.hf import load_tokenizer

    if name == "base":
        raise ValueError("data.tokenizer='base' names the run's base tokenizer, which comigs_jax.experiment resolves; "
                         "outside an experiment name a tokenizer: 'gpt2', a tokenizer directory or a hub id")
    return load_tokenizer(None if name in ("", "gpt2") else os.path.expanduser(name))


def tokenizer_info(tok) -> tuple[int, Optional[int]]:
    """(vocabulary size, eos id or None)."""
    return len(tok), tok.eos_token_id


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the Rust backend encodes on all cores)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


def tokenizer_fingerprint(name: str) -> str:
    """What identifies a tokenizer in cache keys: its name, plus file sizes/mtimes for a folder."""
    path = os.path.expanduser(name)
    if name not in ("", "gpt2") and os.path.isdir(path):
        files = sorted(os.listdir(path))
        st = [(f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns)
              for f in files if os.path.isfile(os.path.join(path, f))]
        return f"{os.path.abspath(path)}:{hashlib.sha256(repr(st).encode()).hexdigest()[:16]}"
    return name or "gpt2"


# ----------------------------------------------------------------------------- cache
def cache_key(fields: dict) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_user_cache(path: str, key: str, user: int, name: str, arrays: dict, vocab_size: int,
                     eos_id: Optional[int], extra: Optional[dict] = None) -> None:
    splits = list(arrays)
    dtype = np.dtype(arrays[splits[0]].dtype)
    payload = b"".join(np.ascontiguousarray(arrays[s], dtype).tobytes() for s in splits)
    header = json.dumps({
        "version": CACHE_VERSION, "key": key, "user": user, "name": name, "dtype": dtype.str,
        "splits": splits, "lengths": [int(len(arrays[s])) for s in splits],
        "crc32": zlib.crc32(payload), "vocab_size": int(vocab_size), "eos_id": eos_id,
        "extra": extra or {},
    }).encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(CACHE_MAGIC + struct.pack("<Q", len(header)) + header + payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_user_cache(path: str, key: str) -> Optional[tuple[dict, dict]]:
    """(header, {split: array}) if `path` is a complete cache file for `key`, else None."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    try:
        if blob[:8] != CACHE_MAGIC:
            return None
        (hlen,) = struct.unpack("<Q", blob[8:16])
        header = json.loads(blob[16:16 + hlen].decode())
        if header.get("version") != CACHE_VERSION or header.get("key") != key:
            return None
        dtype = np.dtype(header["dtype"])
        payload = memoryview(blob)[16 + hlen:]
        if len(payload) != sum(header["lengths"]) * dtype.itemsize or zlib.crc32(payload) != header["crc32"]:
            return None
        arrays, off = {}, 0
        for s, n in zip(header["splits"], header["lengths"]):
            arrays[s] = np.frombuffer(payload, dtype, count=n, offset=off * dtype.itemsize).copy()
            off += n
        return header, arrays
    except (ValueError, KeyError, struct.error, UnicodeDecodeError):
        return None
