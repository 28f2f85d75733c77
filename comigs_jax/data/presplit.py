"""Pre-split text folders for the ``text_files`` source: splits used as given.

A category folder that directly holds a ``train.*`` file is *pre-split*: it must also hold a
``valid.*`` (or ``validation.*``) and a ``test.*`` file, each plain text (documents by
``text_files.sample_by``) or JSON lines (``.jsonl``/``.json``, one document per line, field
``text_files.text_field``). Each split is that file's documents in file order, each followed by
the end-of-text token: no shuffling, no re-splitting, no cut to ``*_tokens``. Every user is one
such folder (partition ``specific``, at most one user per folder); mixing pre-split and plain
folders is an error naming the folder.
"""
from __future__ import annotations

import os

import numpy as np

from comigs_jax.data.config import SPLITS
from comigs_jax.data.sources import DataSourceError

SPLIT_STEMS = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
_JSON_EXT = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _stem(filename: str) -> str:
    return filename.split(".", 1)[0].lower()


def folder_splits(root: str, cat: str) -> dict | None:
    """{split: path} when `root/cat` is pre-split (holds a train.* file), else None."""
    folder = os.path.join(os.path.expanduser(root), cat)
    files = sorted(f for f in os.listdir(folder)
                   if os.path.isfile(os.path.join(folder, f)) and not f.startswith("."))
    if not any(_stem(f) == "train" for f in files):
        return None
    out = {}
    for split, stems in SPLIT_STEMS.items():
        hits = [f for f in files if _stem(f) in stems]
        if not hits:
            raise DataSourceError(f"text_files folder {folder!r} holds a train file, so it is pre-split, but no "
                             f"{' or '.join(s + '.*' for s in stems)} file")
        if len(hits) > 1:
            raise DataSourceError(f"text_files folder {folder!r}: several {split} files ({', '.join(hits)}); keep one")
        out[split] = os.path.join(folder, hits[0])
    return out


def presplit_categories(data_cfg, cats: list[str]) -> bool:
    """True if the users' folders are pre-split, False if none is; an error if they mix."""
    users_cats = [cats[i % len(cats)] for i in range(min(int(data_cfg.n_users), len(cats)))]
    kinds = {c: folder_splits(data_cfg.text_files.root, c) is not None for c in users_cats}
    if len(set(kinds.values())) > 1:
        pre = sorted(c for c, k in kinds.items() if k)
        plain = sorted(c for c, k in kinds.items() if not k)
        raise DataSourceError(f"text_files: folders {pre} are pre-split (train/valid/test files) but {plain} are "
                         "not; use one kind for all users")
    return any(kinds.values())


def check_partition(data_cfg, cats: list[str]) -> None:
    if data_cfg.partition != "specific":
        raise ValueError(f"data.partition={data_cfg.partition!r} is not allowed: 'specific' for pre-split "
                         "text_files folders (each user's splits are its folder's files, as given)")
    if int(data_cfg.n_users) > len(cats):
        raise ValueError(f"data.n_users={data_cfg.n_users} is not allowed: at most the {len(cats)} pre-split "
                         "folders (each user is one folder; users cannot share its fixed splits)")


def split_file(data_cfg, cat: str, split: str) -> str:
    return os.path.abspath(folder_splits(data_cfg.text_files.root, cat)[split])


def read_documents(data_cfg, path: str) -> list[str]:
    """The file's documents in file order (empty ones dropped)."""
    import datasets

    if path.lower().endswith(_JSON_EXT):
        field = data_cfg.text_files.text_field
        docs = []
        for k, row in enumerate(datasets.load_dataset("json", data_files=[path], split="train", streaming=True)):
            if field not in row:
                raise DataSourceError(f"{path}: line {k + 1} has no field {field!r} (keys: {sorted(row)}); "
                                 "set data.text_files.text_field")
            docs.append(row[field])
    else:
        ds = datasets.load_dataset("text", data_files=[path], split="train", streaming=True,
                                   sample_by=data_cfg.text_files.sample_by)
        docs = [row["text"] for row in ds]
    return [d for d in docs if d and d.strip()]


def build_users(data_cfg, cats, users, wanted: list[int]):
    """Tokenise each wanted user's three files -> ({user: {split: array}}, vocab, eos)."""
    from comigs_jax.data import synthetic, tokens

    tok = tokens.get_tokenizer(data_cfg.tokenizer)
    vocab, eos = tokens.tokenizer_info(tok)
    dt = synthetic.token_dtype(data_cfg, vocab)
    if np.iinfo(dt).max < vocab - 1:
        raise ValueError(f"data.dtype={data_cfg.dtype!r} is not allowed: vocabulary of {vocab} needs uint32 or auto")
    tail = [eos] if eos is not None else []
    out = {}
    for i in wanted:
        cat = cats[i % len(cats)]
        arrays = {}
        for s in SPLITS:
            docs = read_documents(data_cfg, split_file(data_cfg, cat, s))
            ids: list[int] = []
            for k in range(0, len(docs), int(data_cfg.tokenize_batch)):
                for doc in tokens.encode_batch(tok, docs[k:k + int(data_cfg.tokenize_batch)]):
                    ids.extend(doc)
                    ids.extend(tail)
            arrays[s] = np.asarray(ids, dt)
        out[i] = arrays
    return out, vocab, eos
