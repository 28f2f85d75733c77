"""Hundreds of real-text users from the offline corpus: one user per natural unit of each source.

Units (a unit's folder is `<group>.<unit>`; groups carry a language and a domain):

    man-de, man-fr, man-ru, man-ja   one unit per man-page family of that language (systemd*, pam_*, ls, ...:
                                     a stand-in for the package; prepare_local_corpus.man_family)
    code                             one unit per standard-library top-level module or package
    pydocs                           one unit per Python documentation tree (library/ by module prefix:
                                     library/asyncio-*.rst is one unit; c-api, howto, ... one each)
    shakespeare                      one unit per play

Unit sizes follow the sources (a few large sections and modules, many small ones), so the
population's sizes are heavy-tailed by construction. `split_population` turns the units into:

    <out>/<group>.<unit>/docs.jsonl   the users: exactly n_users units holding >= min_tokens tokens
    <out>/.heldout/docs.jsonl         every other unit: the text the small base is pretrained on
    <out>/.tokenizer/                 a byte-level BPE of `vocab` tokens trained on the held-out text
    <out>/manifest.json               per user: group, language, domain, documents, bytes, tokens

A seeded share of each group's units is held out first (so the base sees every language and
domain), then units under the `min_tokens` floor (or with fewer than 3 documents: the splits are
dealt whole documents) go to the held-out text, then a seeded sample of
n_users of the rest are the users (the unsampled ones are held out as well). Fewer than n_users
above the floor is an error naming the fix.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field

GROUPS = {  # group -> (language, domain)
    "man-de": ("de", "man"), "man-fr": ("fr", "man"), "man-ru": ("ru", "man"), "man-ja": ("ja", "man"),
    "code": ("python", "code"), "pydocs": ("en", "docs"), "shakespeare": ("en", "drama"),
}
EOS = "<|endoftext|>"


class PopulationError(ValueError):
    """The corpus cannot give the population asked for (one line naming the fix)."""


@dataclass
class Unit:
    group: str  # a key of GROUPS
    name: str  # unique within the group; [A-Za-z0-9_-] only
    docs: list = field(default_factory=list)  # document texts

    @property
    def folder(self) -> str:
        return f"{self.group}.{self.name}"


def slug(text: str) -> str:
    """A folder-safe unit name: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"


def split_long(pieces, max_chars: int) -> list[str]:
    """Each piece longer than max_chars cut at its last line break before the limit (or at the
    limit): a file that is one long paragraph (pydoc_data/topics.py) becomes many documents, as
    splits are dealt whole documents."""
    out = []
    for p in pieces:
        while len(p) > max_chars:
            cut = p.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(p[:cut])
            p = p[cut:].lstrip("\n")
        out.append(p)
    return [p for p in out if p.strip()]


def group_units(group: str, keyed_docs) -> list[Unit]:
    """[(unit key, document)] -> one Unit per key (in key order), documents in input order."""
    units: dict = {}
    for key, doc in keyed_docs:
        units.setdefault(slug(key), Unit(group, slug(key))).docs.append(doc)
    return [units[k] for k in sorted(units)]


def stdlib_units(root: str, chunk, chunk_chars: int) -> list[Unit]:
    """One unit per top-level module or package of the standard library at `root` (tests excluded)."""
    keyed = []
    for f in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        parts = os.path.relpath(f, root).split(os.sep)
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        try:
            text = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        keyed += [(parts[0].removesuffix(".py"), c) for c in chunk(text, chunk_chars)]
    return group_units("code", keyed)


def pydoc_tree(rel: str) -> str:
    """'library/asyncio-task.rst.txt' -> 'library-asyncio'; 'howto/sockets.rst.txt' -> 'howto'."""
    parts = rel.split("/")
    if len(parts) == 1:
        return "top"
    if parts[0] == "library":
        return "library-" + re.split(r"[-.]", parts[-1], maxsplit=1)[0]
    return parts[0]


def pydoc_units(sources_root: str, chunk, chunk_chars: int) -> list[Unit]:
    """One unit per documentation tree under `sources_root` (the HTML docs' _sources folder)."""
    keyed = []
    for f in sorted(glob.glob(os.path.join(sources_root, "**", "*.rst.txt"), recursive=True)):
        try:
            text = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        rel = os.path.relpath(f, sources_root).replace(os.sep, "/")
        keyed += [(pydoc_tree(rel), c) for c in chunk(text, chunk_chars)]
    return group_units("pydocs", keyed)


def train_tokenizer(texts, vocab: int, out_dir: str):
    """A byte-level BPE of `vocab` tokens (end-of-text included) trained on `texts`, saved to
    `out_dir` as a Hugging Face tokenizer folder; returns the loaded fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(out_dir)
    return fast


def _write_docs(folder: str, docs: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "docs.jsonl"), "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


def _hold_out_share(units: list[Unit], share: float, rng: random.Random) -> tuple[list[Unit], list[Unit]]:
    """(kept, held out): a seeded `share` of each group's units (>= 1 where a group has >= 2)."""
    kept, held = [], []
    for g in sorted({u.group for u in units}):
        us = [u for u in units if u.group == g]
        rng.shuffle(us)
        k = min(len(us) - 1, max(1, round(share * len(us)))) if len(us) >= 2 and share > 0 else 0
        held += us[:k]
        kept += us[k:]
    return kept, held


def split_population(units: list[Unit], out: str, n_users: int, min_tokens: int, vocab: int = 1024,
                     heldout_share: float = 0.2, seed: int = 0, skipped: dict | None = None) -> dict:
    """Write the users, the held-out text and the tokenizer to `out` (see the module docstring);
    returns the manifest. PopulationError (one line) when fewer than n_users units reach min_tokens."""
    if n_users < 1 or min_tokens < 1 or vocab <= 257 or not 0 <= heldout_share < 1:
        raise PopulationError(f"n_users={n_users}, min_tokens={min_tokens}, vocab={vocab}, heldout_share="
                              f"{heldout_share}: need n_users >= 1, min_tokens >= 1, vocab > 257, share in [0, 1)")
    rng = random.Random(f"many-users-{seed}")
    units = [u for u in units if u.docs]
    kept, held = _hold_out_share(units, heldout_share, rng)
    if not held:
        raise PopulationError("no held-out text to pretrain the base and train the tokenizer on: "
                              "raise heldout_share or add units")
    for d in glob.glob(os.path.join(out, "*")) + [os.path.join(out, ".heldout"), os.path.join(out, ".tokenizer")]:
        if os.path.isdir(d):
            shutil.rmtree(d)  # a rebuilt population replaces the old one whole
    os.makedirs(out, exist_ok=True)
    tok = train_tokenizer((d for u in held for d in u.docs), vocab, os.path.join(out, ".tokenizer"))
    sizes = {u.folder: sum(len(ids) + 1 for ids in tok(u.docs, add_special_tokens=False)["input_ids"])
             for u in kept}
    above = [u for u in kept if sizes[u.folder] >= min_tokens and len(u.docs) >= 3]  # a document per split
    if len(above) < n_users:
        why = "; ".join(f"{k}: {v}" for k, v in sorted((skipped or {}).items()))
        raise PopulationError(
            f"only {len(above)} units hold >= min_tokens={min_tokens} tokens in >= 3 documents (n_users={n_users} "
            f"asked): lower "
            f"--min-tokens or --n-users" + (f", or install the missing sources ({why})" if why else ""))
    users = sorted(rng.sample(above, n_users), key=lambda u: u.folder)
    chosen = {u.folder for u in users}
    held += [u for u in kept if u.folder not in chosen]
    for u in users:
        _write_docs(os.path.join(out, u.folder), u.docs)
    _write_docs(os.path.join(out, ".heldout"), [d for u in sorted(held, key=lambda u: u.folder) for d in u.docs])
    manifest = {
        "population": {"n_users": n_users, "min_tokens": min_tokens, "vocab": vocab, "heldout_share": heldout_share,
                       "seed": seed, "units": len(units), "heldout_units": len(held), "tokenizer": ".tokenizer",
                       "heldout": ".heldout"},
        "users": {u.folder: {"group": u.group, "language": GROUPS[u.group][0], "domain": GROUPS[u.group][1],
                             "documents": len(u.docs), "bytes": sum(len(d.encode()) for d in u.docs),
                             "tokens": sizes[u.folder]} for u in users},
        "heldout": {"units": sorted(u.folder for u in held), "documents": sum(len(u.docs) for u in held)},
        "skipped": dict(skipped or {}),
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    return manifest


def user_groups(root: str) -> dict:
    """{user folder: group} from a population's manifest.json ({} when it has none)."""
    path = os.path.join(os.path.expanduser(root), "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            return {u: v["group"] for u, v in json.load(f).get("users", {}).items() if "group" in v}
    except (OSError, ValueError):
        return {}
