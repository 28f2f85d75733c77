"""text_files source: splits by document, determinism, partitions, caches, errors."""
import os
import random
import re

import numpy as np
import pytest

from comigs_jax.data import InsufficientDataError, default_data_config, load_user_data, tokens

WORDS = {
    "de": "der die das und ist nicht ein eine mit auf für von dem den".split(),
    "fr": "le la les et est pas un une avec sur pour de du des".split(),
    "code": "def return if else for in import self while class None True".split(),
    "poem": "thou thee thy art doth hath love night day sweet fair heart".split(),
}
N_DOCS = 120


def write_corpus(root, cats=WORDS, n_docs=N_DOCS):
    """Paragraph documents, each starting with a unique marker 'Q<cat><n>Q'."""
    for cat, words in cats.items():
        d = os.path.join(root, cat)
        os.makedirs(d, exist_ok=True)
        r = random.Random(cat)
        for f in range(3):
            paras = []
            for k in range(n_docs // 3):
                n = f * (n_docs // 3) + k
                paras.append(f"Q{cat}{n}Q " + " ".join(r.choice(words) for _ in range(r.randint(20, 60))))
            with open(os.path.join(d, f"part{f}.txt"), "w") as fh:
                fh.write("\n\n".join(paras) + "\n")
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(str(tmp_path / "corpus"))


def _cfg(root, cache, **kw):
    c = default_data_config()
    c.source = "text_files"
    c.text_files.root = root
    c.cache_dir = str(cache)
    c.train_tokens, c.valid_tokens, c.test_tokens = 3000, 600, 600
    c.progress = False
    for k, v in kw.items():
        c[k] = v
    return c


def markers(arr, eos=50256):
    """Document markers in a token array (documents are separated by eos)."""
    tok = tokens.get_tokenizer("gpt2")
    out = []
    for doc in np.split(arr, np.where(arr == eos)[0] + 1):
        text = tok.decode([int(t) for t in doc if t != eos])
        m = re.match(r"\s*Q(\w+?)(\d+)Q", text)
        if m:
            out.append((m.group(1), int(m.group(2))))
    return out


def test_splits_sizes_disjoint_by_document(corpus, tmp_path):
    d = load_user_data(_cfg(corpus, tmp_path / "c"))
    assert d.users == ["code", "de", "fr", "poem"]  # folder names, sorted
    assert d.vocab_size == 50257 and d.eos_id == 50256
    seen = {}
    for i, name in enumerate(d.users):
        for s, n in (("train", 3000), ("valid", 600), ("test", 600)):
            a = d.split(s)[i]
            assert a.dtype == np.uint16 and len(a) == n
            ms = markers(a)
            assert ms and all(cat == name for cat, _ in ms)
            for m in ms:
                assert m not in seen, f"document {m} in both {seen[m]} and {(name, s)}"
                seen[m] = (name, s)
        # documents are joined with end-of-text
        assert np.sum(d.train[i] == 50256) >= 5


def test_deterministic_and_seeded(corpus, tmp_path):
    a = load_user_data(_cfg(corpus, tmp_path / "a"))
    b = load_user_data(_cfg(corpus, tmp_path / "b"))  # a fresh cache: rebuilt from text
    assert b.info["cache_hits"] == []
    for s in ("train", "valid", "test"):
        for x, y in zip(a.split(s), b.split(s)):
            np.testing.assert_array_equal(x, y)
    c = load_user_data(_cfg(corpus, tmp_path / "c", seed=1))
    assert not np.array_equal(a.train[0], c.train[0])


def test_subset_equals_full_build(corpus, tmp_path):
    full = load_user_data(_cfg(corpus, tmp_path / "full", partition="mixed"))
    sub = load_user_data(_cfg(corpus, tmp_path / "sub", partition="mixed"), user_indices=[3, 1])
    assert sub.indices == [3, 1] and sub.users == [full.users[3], full.users[1]]
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(sub.split(s)[0], full.split(s)[3])
        np.testing.assert_array_equal(sub.split(s)[1], full.split(s)[1])


def test_cache_hit_does_no_tokenisation_and_keys_miss(corpus, tmp_path, monkeypatch):
    calls = []
    real = tokens.encode_batch
    monkeypatch.setattr(tokens, "encode_batch", lambda tok, texts: calls.append(len(texts)) or real(tok, texts))
    cfg = _cfg(corpus, tmp_path / "cache")
    first = load_user_data(cfg)
    assert calls and first.info["cache_hits"] == []
    n = len(calls)
    second = load_user_data(cfg)
    assert len(calls) == n, "a cache hit must not tokenise"
    assert second.info["cache_hits"] == [0, 1, 2, 3]
    for x, y in zip(first.train, second.train):
        np.testing.assert_array_equal(x, y)
    # every key field misses
    for field, value in [("seed", 3), ("train_tokens", 2900), ("valid_tokens", 500), ("test_tokens", 500),
                         ("partition", "mixed"), ("categories", "de,fr,code,poem"), ("n_users", 3)]:
        c2 = _cfg(corpus, tmp_path / "cache", **{field: value})
        k = len(calls)
        assert load_user_data(c2).info["cache_hits"] == [], field
        assert len(calls) > k, field
    c3 = _cfg(corpus, tmp_path / "cache")
    c3.text_files.sample_by = "line"
    assert load_user_data(c3).info["cache_hits"] == []
    # a changed file changes the key
    with open(os.path.join(corpus, "de", "part0.txt"), "a") as f:
        f.write("\n\nQde999Q und ist\n")
    assert load_user_data(cfg).info["cache_hits"] == []


def test_truncated_or_old_cache_is_rebuilt(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "cache")
    ref = load_user_data(cfg)
    folder = ref.info["cache_dir"]
    files = sorted(os.listdir(folder))
    assert files == [f"user{i:05d}.tokens" for i in range(4)]  # no temporary files left
    p0, p1 = os.path.join(folder, files[0]), os.path.join(folder, files[1])
    with open(p0, "r+b") as f:  # truncated
        f.truncate(os.path.getsize(p0) - 10)
    blob = open(p1, "rb").read()
    with open(p1, "wb") as f:  # an old format version
        f.write(blob.replace(b'"version": 1', b'"version": 0', 1))
    again = load_user_data(cfg)
    assert again.info["cache_hits"] == [2, 3]
    for x, y in zip(ref.train, again.train):
        np.testing.assert_array_equal(x, y)
    assert tokens.read_user_cache(p0, ref.info["cache_key"]) is not None
    # a flipped payload byte fails the checksum
    blob = bytearray(open(p0, "rb").read())
    blob[-3] ^= 0xFF
    open(p0, "wb").write(bytes(blob))
    assert tokens.read_user_cache(p0, ref.info["cache_key"]) is None


def test_partitions_share_documents_as_specified(corpus, tmp_path):
    d = load_user_data(_cfg(corpus, tmp_path / "m", partition="mixed", categories="de,fr,code,poem"))
    assert d.users == ["de:0.25+fr:0.75", "de:0.75+fr:0.25", "code:0.25+poem:0.75", "code:0.75+poem:0.25"]
    assert d.info["parts"][0]["train"] == [("de", 750), ("fr", 2250)]
    seen = set()
    for i in range(4):
        ms = markers(d.train[i])
        cats = {c for c, _ in ms}
        assert cats == set(d.users[i].replace(":0.25", "").replace(":0.75", "").split("+"))
        assert not seen & set(ms)
        seen |= set(ms)
    o = load_user_data(_cfg(corpus, tmp_path / "o", partition="ood", ood_target_share=0.25))
    assert o.info["parts"][0] == {"train": [("de", 2250), ("code", 750)], "valid": [("code", 600)],
                                  "test": [("code", 600)]}
    assert {c for c, _ in markers(o.test[0])} == {"code"}
    assert {c for c, _ in markers(o.train[0])} == {"de", "code"}
    r = load_user_data(_cfg(corpus, tmp_path / "r", partition="dirichlet", dirichlet_alpha=0.3,
                            train_tokens=1500, valid_tokens=300, test_tokens=300))
    for i in range(4):
        parts = r.info["parts"][i]["train"]
        assert sum(n for _, n in parts) == 1500 and len(r.train[i]) == 1500
        assert {c for c, _ in markers(r.train[i])} <= {c for c, _ in parts}


def test_not_enough_text_names_user_and_sizes(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "c", train_tokens=40_000)
    with pytest.raises(InsufficientDataError, match=r"user 0 \(code\): train split needs 40000 tokens of 'code'"):
        load_user_data(cfg)
    cfg = _cfg(corpus, tmp_path / "c", train_tokens=40_000, allow_fewer_tokens=True, min_tokens=64)
    d = load_user_data(cfg)
    assert 1000 < len(d.train[0]) < 40_000
    # fewer tokens than one window, even when shortfalls are allowed
    small = write_corpus(str(tmp_path / "small"), {"tiny": WORDS["de"], "de": WORDS["de"]}, n_docs=3)
    cfg = _cfg(small, tmp_path / "c2", categories="tiny", n_users=1, allow_fewer_tokens=True)
    with pytest.raises(InsufficientDataError, match=r"user 0 \(tiny\): \w+ split has \d+ tokens, fewer than one window \(min_tokens=129"):
        load_user_data(cfg)


def test_jsonl_files_and_text_field(tmp_path):
    import json
    root = tmp_path / "j"
    for cat in ("a", "b"):
        (root / cat).mkdir(parents=True)
        with open(root / cat / "docs.jsonl", "w") as f:
            for n in range(150):
                f.write(json.dumps({"body": f"Q{cat}{n}Q " + " ".join(["word"] * 40), "id": n}) + "\n")
    cfg = _cfg(str(root), tmp_path / "c", n_users=2)
    cfg.text_files.text_field = "body"
    d = load_user_data(cfg)
    assert d.users == ["a", "b"] and {c for c, _ in markers(d.train[1])} == {"b"}
    cfg.text_files.text_field = "text"
    with pytest.raises(Exception, match="field 'text'"):
        load_user_data(cfg)
