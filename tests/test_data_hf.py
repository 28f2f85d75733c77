"""Hub sources: row -> user mapping on local files with the real schemas, offline failures."""
import json
import os
import time

import pytest

from comigs_jax.data import DataSourceError, default_data_config, load_user_data
from comigs_jax.data import sources
from tests.test_data_text_files import markers

SP_SETS = ["RedPajamaArXiv", "RedPajamaBook", "RedPajamaC4", "RedPajamaCommonCrawl", "RedPajamaGithub",
           "RedPajamaStackExchange", "RedPajamaWikipedia"]


def _cfg(source, cache, **kw):
    c = default_data_config()
    c.source = source
    c.cache_dir = str(cache)
    c.train_tokens, c.valid_tokens, c.test_tokens = 1500, 300, 300
    c.progress = False
    c.shuffle_buffer = 64
    for k, v in kw.items():
        c[k] = v
    return c


def _body(n=40):
    return " ".join(["word", "text", "more"] * (n // 3))


def test_slimpajama_rows_map_to_set_names(tmp_path):
    path = tmp_path / "sp.jsonl"
    with open(path, "w") as f:  # the SlimPajama schema: text, meta.redpajama_set_name, __index_level_0__
        for n in range(7 * 90):
            s = SP_SETS[n % 7]
            f.write(json.dumps({"text": f"Q{s[9:].replace('4', 'four')}{n}Q {_body()}", "meta": {"redpajama_set_name": s},
                                "__index_level_0__": n}) + "\n")
    c = _cfg("slimpajama", tmp_path / "c", categories="Github,C4,StackExchange")
    c.n_users = 3
    c.slimpajama.data_files = str(path)
    d = load_user_data(c)
    assert d.users == ["Github", "C4", "StackExchange"]
    for i, name in enumerate(d.users):
        for s in ("train", "valid", "test"):
            assert {cat for cat, _ in markers(d.split(s)[i])} == {name.replace("4", "four")}
    assert sources.slimpajama_category({"meta": json.dumps({"redpajama_set_name": "RedPajamaBook"})}) == "Book"
    # the same rows as parquet (the hub's file format) go through the same path
    import datasets
    rows = [json.loads(l) for l in open(path)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "sp.parquet"))
    c.slimpajama.data_files = str(tmp_path / "sp.parquet")
    c.shuffle_buffer = 0  # a shuffled parquet stream closed early waits 5 s in datasets' shutdown
    d2 = load_user_data(c)
    for i, name in enumerate(d2.users):
        assert {cat for cat, _ in markers(d2.test[i])} == {name.replace("4", "four")}


def test_agnews_labels_map_to_categories(tmp_path):
    names = ["World", "Sports", "Business", "SciTech"]
    path = tmp_path / "ag.jsonl"
    with open(path, "w") as f:  # the AG News schema: text, label (0..3)
        for n in range(4 * 100):
            f.write(json.dumps({"text": f"Q{names[n % 4]}{n}Q {_body()}", "label": n % 4}) + "\n")
    c = _cfg("agnews", tmp_path / "c", partition="mixed")
    c.agnews.data_files = str(path)
    d = load_user_data(c)
    assert d.users == ["World:0.25+Sports:0.75", "World:0.75+Sports:0.25",
                       "Business:0.25+Sci/Tech:0.75", "Business:0.75+Sci/Tech:0.25"]
    assert {c for c, _ in markers(d.train[0])} == {"World", "Sports"}
    assert {c for c, _ in markers(d.test[3])} == {"Business", "SciTech"}


def test_wikipedia_languages_from_files(tmp_path):
    for lang in ("de", "fr"):
        (tmp_path / lang).mkdir()
        with open(tmp_path / lang / "train.jsonl", "w") as f:  # wikimedia/wikipedia: id, url, title, text
            for n in range(120):
                f.write(json.dumps({"id": str(n), "url": "u", "title": "t", "text": f"Q{lang}{n}Q {_body()}"}) + "\n")
    c = _cfg("wikipedia", tmp_path / "c", categories="fr,de")
    c.n_users = 2
    c.wikipedia.data_files = str(tmp_path / "{lang}" / "*.jsonl")
    d = load_user_data(c)
    assert d.users == ["fr", "de"]
    assert {c for c, _ in markers(d.train[0])} == {"fr"} and {c for c, _ in markers(d.valid[1])} == {"de"}


@pytest.mark.parametrize("source", ["slimpajama", "agnews", "wikipedia"])
def test_offline_hub_request_fails_fast_with_advice(source, tmp_path):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
    c = _cfg(source, tmp_path / "c")
    t = time.time()
    with pytest.raises(DataSourceError) as e:
        load_user_data(c)
    assert time.time() - t < 5.0
    msg = str(e.value)
    assert c[source].dataset in msg and "offline" in msg.lower() or "OfflineMode" in msg
    assert "instead" in msg and "data_files" in msg and "prepare_local_corpus" in msg
    assert "\n" not in msg


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    c = _cfg("slimpajama", tmp_path / "c")
    t = time.time()
    with pytest.raises(DataSourceError, match=r"DKYoon/SlimPajama-6B.*unreachable.*instead"):
        load_user_data(c)
    assert time.time() - t < 5.0
