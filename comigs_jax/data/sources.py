"""Document sources: every source yields (category, text) pairs in a deterministic order.

* ``slimpajama`` and ``agnews`` read one labelled stream and map each row to its category
  (`slimpajama_category`, `agnews_category`); ``wikipedia`` and ``text_files`` read one stream
  per category (language, folder). All of them go through `datasets.load_dataset`: hub ids, or
  local files with the hub's schema (`data.<source>.data_files`), which is how tests exercise
  the same code path offline.
* Hub data sets are never waited for: offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or an
  unreachable hub raises `DataSourceError` at once, naming the data set, the reason, and what to
  run instead. Non-streaming loads still read the local `datasets` cache when offline.
* Order: hub streams are shuffled with a seeded buffer (`data.shuffle_buffer`); local files are
  read whole per category and permuted with a seeded permutation.

The consumer passes a mutable set ``needed`` of categories it still wants; sources skip the others
and stop reading once the set is empty.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import threading
import zlib
from typing import Iterable, Iterator, Optional
from urllib.parse import urlparse

import numpy as np

from comigs_jax.data.config import AGNEWS_CATEGORIES, split_list


class DataSourceError(RuntimeError):
    """A data source cannot be read (hub unreachable or offline, missing files, bad schema)."""


# ----------------------------------------------------------------------------- row -> category
def slimpajama_category(row: dict) -> Optional[str]:
    """`meta.redpajama_set_name` ('RedPajamaC4', ...) -> 'C4'."""
    meta = row.get("meta")
    if isinstance(meta, str):
        meta = json.loads(meta)
    name = (meta or {}).get("redpajama_set_name")
    if name is None:
        raise DataSourceError(f"SlimPajama row without meta.redpajama_set_name (keys: {sorted(row)})")
    return name[len("RedPajama"):] if name.startswith("RedPajama") else name


def agnews_category(row: dict) -> Optional[str]:
    """`label` 0..3 -> World, Sports, Business, Sci/Tech."""
    return AGNEWS_CATEGORIES[int(row["label"])]


# ----------------------------------------------------------------------------- hub access
def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    return _flag("HF_HUB_OFFLINE") or _flag("HF_DATASETS_OFFLINE")


def _probe_hub(timeout: float = 3.0) -> Optional[str]:
    """None if the hub answers a TCP connection within `timeout` seconds, else the reason."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port} unreachable ({type(e).__name__}: {e})")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # name resolution can block longer than the socket timeout
    return result[0] if result else f"{host}:{port} did not answer within {timeout:.0f} s"


def _instead(src: str, dataset: str, config_name: str = "") -> str:
    inc = f" --include '{config_name}/*'" if src == "wikipedia" and config_name else ""
    files = "'DIR/{lang}/*.parquet'" if src == "wikipedia" else "'DIR/**/*.parquet'"
    return (f"instead: run once where the hub is reachable (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE; "
            f"with data.{src}.streaming=False the rows stay in the local datasets cache), or download the files "
            f"(`hf download {dataset} --repo-type dataset{inc} --local-dir DIR`) and set "
            f"data.{src}.data_files={files}, or use data.source='text_files' on a folder made by "
            f"`python -m experiments.prepare_local_corpus`")


def check_hub(src: str, dataset: str, config_name: str, streaming: bool) -> None:
    """Fail at once (DataSourceError) if a hub data set cannot be reached; no-op otherwise."""
    what = f"Hugging Face dataset {dataset!r}" + (f" (config {config_name!r})" if config_name else "")
    if hub_offline():
        if streaming:
            raise DataSourceError(f"cannot stream {what}: offline mode (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); "
                                  + _instead(src, dataset, config_name))
        return  # non-streaming loads may still find the local datasets cache
    reason = _probe_hub()
    if reason:
        raise DataSourceError(f"cannot load {what}: the hub is unreachable, {reason}; "
                              + _instead(src, dataset, config_name))


def preflight(data_cfg, categories: list[str]) -> None:
    """Cheap availability check of a hub source before any tokenizer is loaded."""
    src = data_cfg.source
    if src in ("slimpajama", "agnews"):
        sub = data_cfg[src]
        if not sub.data_files:
            check_hub(src, sub.dataset, sub.config_name, sub.streaming)
    elif src == "wikipedia" and not data_cfg.wikipedia.data_files and categories:
        sub = data_cfg.wikipedia
        check_hub(src, sub.dataset, f"{sub.dump}.{categories[0]}", sub.streaming)


def _builder_for(files: list[str]) -> str:
    exts = {os.path.basename(f).split(".", 1)[-1].lower() for f in files}
    exts = {e[:-3] if e.endswith(".gz") else e for e in exts}
    if exts <= {"json", "jsonl"}:
        return "json"
    if exts <= {"parquet"}:
        return "parquet"
    if exts <= {"csv"}:
        return "csv"
    if exts <= {"arrow"}:
        return "arrow"
    raise DataSourceError(f"local data files must be all json/jsonl, parquet, csv or arrow; got {sorted(exts)}")


def load_rows(src: str, dataset: str, config_name: str, split: str, revision: str, streaming: bool,
              data_files: str, seed: int, shuffle_buffer: int) -> Iterable[dict]:
    """Rows of a hub data set (or of local files with its schema), shuffled with a seed."""
    import datasets

    if data_files:
        files = sorted(glob.glob(os.path.expanduser(data_files), recursive=True))
        if not files:
            raise DataSourceError(f"data.{src}.data_files={data_files!r} matches no file")
        # local files are streamed: nothing is written to the datasets cache
        ds = datasets.load_dataset(_builder_for(files), data_files=files, split="train", streaming=True)
        return ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds
    what = f"Hugging Face dataset {dataset!r}" + (f" (config {config_name!r})" if config_name else "")
    check_hub(src, dataset, config_name, streaming)
    try:
        ds = datasets.load_dataset(dataset, config_name or None, split=split, streaming=streaming,
                                   revision=revision or None)
    except Exception as e:  # offline cache miss, unknown id, network error
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise DataSourceError(f"cannot load {what}: {type(e).__name__}: {first[:300]}; "
                              + _instead(src, dataset, config_name)) from None
    if streaming:
        return ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds
    return ds.shuffle(seed=seed)


# ----------------------------------------------------------------------------- sources
def _labelled(rows: Iterable[dict], mapper, needed: set, max_rows: int, text_field: str = "text"):
    for k, row in enumerate(rows):
        if not needed or (max_rows and k >= max_rows):
            return
        cat = mapper(row)
        if cat in needed:
            yield cat, row[text_field]


def _category_seed(data_cfg, cat: str) -> list:
    return [int(data_cfg.seed), 6001, zlib.crc32(cat.encode())]


def text_file_list(data_cfg, cat: str) -> list[str]:
    root = os.path.join(os.path.expanduser(data_cfg.text_files.root), cat)
    pat = os.path.join(root, data_cfg.text_files.pattern)
    return sorted(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f)
                  and not os.path.basename(f).startswith("."))


def _text_file_docs(data_cfg, cat: str) -> list[str]:
    import datasets

    files = text_file_list(data_cfg, cat)
    if not files:
        raise DataSourceError(f"text_files category {cat!r}: no file matches "
                              f"{os.path.join(data_cfg.text_files.root, cat, data_cfg.text_files.pattern)!r}")
    is_json = [f.lower().endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")) for f in files]
    docs: list[str] = []
    json_files = [f for f, j in zip(files, is_json) if j]
    txt_files = [f for f, j in zip(files, is_json) if not j]
    field = data_cfg.text_files.text_field
    if json_files:
        ds = datasets.load_dataset("json", data_files=json_files, split="train", streaming=True)
        for row in ds:
            if field not in row:
                raise DataSourceError(f"text_files category {cat!r}: JSON rows lack field {field!r} "
                                      f"(keys: {sorted(row)}); set data.text_files.text_field")
            docs.append(row[field])
    if txt_files:
        ds = datasets.load_dataset("text", data_files=txt_files, split="train", streaming=True,
                                   sample_by=data_cfg.text_files.sample_by)
        try:
            docs.extend(row["text"] for row in ds)
        except UnicodeDecodeError:
            raise DataSourceError(_not_utf8(cat, txt_files)) from None
    return docs


def _not_utf8(cat: str, files: list[str]) -> str:
    """One line naming the first file of `files` that is not valid UTF-8, and where."""
    for f in files:
        with open(f, "rb") as fh:
            blob = fh.read()
        try:
            blob.decode("utf-8")
        except UnicodeDecodeError as e:
            return (f"text_files category {cat!r}: {f} is not UTF-8 (byte 0x{blob[e.start]:02x} at offset {e.start}); "
                    "convert it (e.g. iconv -f latin1 -t utf-8) or remove it")
    return f"text_files category {cat!r}: a file is not UTF-8"


def iter_documents(data_cfg, categories: list[str], needed: set) -> Iterator[tuple[str, str]]:
    """(category, text) for the categories in `needed` (a set the caller may shrink while reading)."""
    src, seed, buf, max_rows = data_cfg.source, int(data_cfg.seed), int(data_cfg.shuffle_buffer), int(data_cfg.max_documents)
    if src == "text_files":
        for cat in categories:
            if cat not in needed:
                continue
            docs = _text_file_docs(data_cfg, cat)
            perm = np.random.default_rng(_category_seed(data_cfg, cat)).permutation(len(docs))
            for k, j in enumerate(perm):
                if cat not in needed or (max_rows and k >= max_rows):
                    break
                yield cat, docs[j]
    elif src in ("slimpajama", "agnews"):
        sub = data_cfg[src]
        rows = load_rows(src, sub.dataset, sub.config_name, sub.split, sub.revision, sub.streaming,
                         sub.data_files, seed, buf)
        yield from _labelled(rows, slimpajama_category if src == "slimpajama" else agnews_category, needed, max_rows)
    elif src == "wikipedia":
        sub = data_cfg.wikipedia
        for lang in categories:
            if lang not in needed:
                continue
            files = sub.data_files.replace("{lang}", lang) if sub.data_files else ""
            rows = load_rows(src, sub.dataset, f"{sub.dump}.{lang}", sub.split, sub.revision, sub.streaming,
                             files, seed, buf)
            for k, row in enumerate(rows):
                if lang not in needed or (max_rows and k >= max_rows):
                    break
                yield lang, row["text"]
    else:
        raise ValueError(f"data.source={src!r} has no documents (synthetic users are generated)")


def source_fingerprint(data_cfg, categories: list[str]) -> dict:
    """What identifies the source's content in cache keys (local files by size and mtime)."""
    src = data_cfg.source
    fp: dict = {"source": src, "shuffle_buffer": int(data_cfg.shuffle_buffer),
                "max_documents": int(data_cfg.max_documents)}
    if src == "text_files":
        fp["text_files"] = {k: data_cfg.text_files[k] for k in ("pattern", "sample_by", "text_field")}
        fp["root"] = os.path.abspath(os.path.expanduser(data_cfg.text_files.root))
        files = {}
        for c in categories:
            st = []
            for f in text_file_list(data_cfg, c):
                s = os.stat(f)
                st.append((os.path.relpath(f, fp["root"]), s.st_size, s.st_mtime_ns))
            files[c] = st
        fp["files"] = files
    elif src in ("slimpajama", "agnews", "wikipedia"):
        sub = data_cfg[src].to_dict()
        sub.pop("extra_languages", None)
        fp[src] = sub
        if sub.get("data_files"):
            pats = [sub["data_files"].replace("{lang}", c) for c in categories] if src == "wikipedia" else [sub["data_files"]]
            st = []
            for p in pats:
                for f in sorted(glob.glob(os.path.expanduser(p), recursive=True)):
                    s = os.stat(f)
                    st.append((os.path.abspath(f), s.st_size, s.st_mtime_ns))
            fp["files"] = st
    return fp


__all__ = ["DataSourceError", "slimpajama_category", "agnews_category", "iter_documents", "load_rows",
           "source_fingerprint", "hub_offline", "split_list"]
