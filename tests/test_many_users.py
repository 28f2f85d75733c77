"""The many-users population (experiments/many_users_corpus.py) on a tiny corpus built here: the
real splitting, the real text_files loader, the text-pretrained base, configs/many_users.py and
the per-group report. Oracles: the saved tokenizer.json read back by the `tokenizers` library
itself, the documents as written, scipy.stats for the paired intervals."""
import collections
import json
import os
import random

import numpy as np
import pytest
from scipy import stats

from comigs_jax import configuration
from comigs_jax.data import default_data_config, load_user_data
from comigs_jax.data.text_stream import text_stream
from experiments import many_users_corpus as mu
from experiments import many_users_report as report

WORDS = {"code": "def return import self class None for in if else lambda yield".split(),
         "shakespeare": "thou thee art lord king love death night sweet fair hath doth".split(),
         "man-de": "Datei Befehl wird Option gelesen Ausgabe Verzeichnis Benutzer".split()}
# (group, unit, documents): sizes spread like a real population, a few large units and small ones
SIZES = {"code": [40, 20, 8, 5, 2, 1], "shakespeare": [30, 12, 6, 3], "man-de": [25, 9, 4]}


def _units(seed=0) -> list:
    rng = random.Random(seed)
    units = []
    for g, sizes in SIZES.items():
        for k, n in enumerate(sizes):
            docs = [" ".join(rng.choice(WORDS[g]) for _ in range(rng.randint(40, 70))) + f" {g}{k}-{d}."
                    for d in range(n)]
            units.append(mu.Unit(g, f"u{k}", docs))
    return units


def _docs(folder) -> list:
    return [json.loads(line)["text"] for line in open(os.path.join(folder, "docs.jsonl"), encoding="utf-8")]


def _oracle(out):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(out / ".tokenizer" / "tokenizer.json"))


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    out = tmp_path_factory.mktemp("pop") / "many"
    man = mu.split_population(_units(), str(out), n_users=6, min_tokens=600, vocab=300, heldout_share=0.2, seed=0)
    return out, man


def test_split_population_partitions_the_units(population):
    out, man = population
    tok = _oracle(out)
    eos = tok.token_to_id(mu.EOS)
    folders = sorted(d for d in os.listdir(out) if not d.startswith(".") and os.path.isdir(out / d))
    assert folders == sorted(man["users"]) and len(folders) == 6
    by_name = {u.folder: u for u in _units()}
    for f in folders:  # a user is one whole unit, above the floor, counted as the saved tokenizer counts
        assert _docs(out / f) == by_name[f].docs
        n = sum(len(tok.encode(d).ids) + 1 for d in by_name[f].docs)
        assert n == man["users"][f]["tokens"] >= 600 and man["users"][f]["group"] == by_name[f].group
    held = _docs(out / ".heldout")  # every other unit is pretraining text: the documents split in two, exactly
    users = [d for f in folders for d in _docs(out / f)]
    assert collections.Counter(held + users) == collections.Counter(d for u in _units() for d in u.docs)
    assert {u.split(".")[0] for u in man["heldout"]["units"]} == set(SIZES)  # every group seen by the base
    assert eos is not None and tok.get_vocab_size() <= 300
    again = mu.split_population(_units(), str(out.parent / "again"), 6, 600, 300, 0.2, seed=0)
    assert again["users"] == man["users"]  # seeded


def test_fewer_users_than_asked_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(mu.PopulationError) as e:
        mu.split_population(_units(), str(tmp_path / "p"), n_users=50, min_tokens=600, vocab=300,
                            skipped={"man-ru": "apt-get install -y manpages-ru"})
    msg = str(e.value)
    assert "\n" not in msg and "n_users=50" in msg and "lower --min-tokens or --n-users" in msg
    assert "apt-get install -y manpages-ru" in msg


def test_the_real_loader_reads_the_population(population, tmp_path):
    out, man = population
    tok = _oracle(out)
    eos = tok.token_to_id(mu.EOS)
    c = default_data_config()
    c.source, c.n_users, c.progress, c.allow_fewer_tokens, c.min_tokens = "text_files", 6, False, True, 17
    c.text_files.root, c.tokenizer, c.cache_dir = str(out), str(out / ".tokenizer"), str(tmp_path / "cache")
    c.train_tokens, c.valid_tokens, c.test_tokens = 100_000, 10_000, 10_000  # caps above every user
    d = load_user_data(c)
    assert d.users == sorted(man["users"]) and d.eos_id == eos
    for i, name in enumerate(d.users):  # all of a user's text, each document once, in one of its splits
        docs = _docs(out / name)
        got = np.concatenate([d.train[i], d.valid[i], d.test[i]])
        assert len(got) == man["users"][name]["tokens"] and int((got == eos).sum()) == len(docs)
        want = sorted(tok.encode(x).ids + [eos] for x in docs)
        pieces = [np.split(s, np.flatnonzero(s == eos) + 1) for s in (d.train[i], d.valid[i], d.test[i])]
        assert all(len(p[-1]) == 0 for p in pieces)  # every split ends with a whole document
        assert sorted(x.tolist() for p in pieces for x in p[:-1]) == want
    c.n_users = 7
    with pytest.raises(ValueError) as e:
        load_user_data(c)
    assert "data.n_users=7" in str(e.value) and "prepare_local_corpus --many-users" in str(e.value)


def test_text_stream_is_the_heldout_documents(population):
    out, _ = population
    tok = _oracle(out)
    eos = tok.token_to_id(mu.EOS)
    docs = _docs(out / ".heldout")
    s = text_stream(str(out / ".heldout"), str(out / ".tokenizer"), 10 ** 7, seed=3)
    pieces = sorted(p.tolist() for p in np.split(s, np.flatnonzero(s == eos) + 1)[:-1])
    assert pieces == sorted(tok.encode(x).ids + [eos] for x in docs)
    assert len(text_stream(str(out / ".heldout"), str(out / ".tokenizer"), 500, seed=3)) == 500


def test_stdlib_units_and_docs_trees(tmp_path):
    for rel in ("json/__init__.py", "json/decoder.py", "os.py", "test/test_os.py", "email/tests/t.py", "email/mime.py"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# {rel}\nx = 1\n")
    units = {u.name: u.docs for u in mu.stdlib_units(str(tmp_path), lambda t, n: [t], 1000)}
    assert sorted(units) == ["email", "json", "os"] and len(units["json"]) == 2
    long = "a" * 25 + "\n" + "b" * 12
    assert mu.split_long([long, "c"], 10) == ["a" * 10, "a" * 10, "a" * 5, "b" * 10, "bb", "c"]
    assert mu.split_long(["x" * 6 + "\n" + "y" * 6], 10) == ["x" * 6, "y" * 6]
    assert mu.pydoc_tree("library/asyncio-task.rst.txt") == "library-asyncio"
    assert mu.pydoc_tree("library/os.path.rst.txt") == "library-os"
    assert mu.pydoc_tree("howto/sockets.rst.txt") == "howto" and mu.pydoc_tree("glossary.rst.txt") == "top"


def test_many_users_config_and_bad_pretrain_text(population):
    from configs import many_users
    c = many_users.get_config()
    assert c.data.n_users >= 256 and c.methods == "local,fedavg,comigs" and len(c.seeds.split(",")) >= 3
    assert c.federation.stack_seeds and 0 < c.federation.participation < 1 and c.train.user_chunk > 0
    out, _ = population
    c.data.text_files.root, c.data.tokenizer, c.pretrain.text = str(out), str(out / ".tokenizer"), str(out / ".heldout")
    c.data.n_users, c.train.user_chunk = 6, 2
    configuration.validate(c)
    c.pretrain.text = str(out / "missing")
    with pytest.raises(configuration.ConfigError, match=r"pretrain.text=.*an existing folder"):
        configuration.validate(c)


def test_a_tiny_many_users_run(population, tmp_path):
    """configs/many_users.py end to end on the tiny population: a base pretrained on the held-out
    text, every user's quantiles and histogram written."""
    from entrypoint import main
    out, man = population
    wd = tmp_path / "wd"
    p = main(["--config=configs/many_users.py", f"--workdir={wd}", f"--config.data.text_files.root={out}",
              f"--config.data.tokenizer={out / '.tokenizer'}", f"--config.pretrain.text={out / '.heldout'}",
              "--config.data.n_users=6", "--config.methods=local,comigs", "--config.seeds=0,1",
              "--config.train.user_chunk=2", "--config.train.rounds=2", "--config.train.local_steps=2",
              "--config.train.seq_len=16", "--config.train.batch_size=2", "--config.data.train_tokens=2000",
              "--config.data.valid_tokens=300", "--config.data.test_tokens=300", "--config.pretrain.steps=5",
              "--config.pretrain.n_embd=16", "--config.pretrain.n_layer=1", "--config.pretrain.tokens=3000",
              "--config.eval.every_rounds=2", "--config.checkpoint.every_rounds=2", "--config.output.per_user_limit=4"],
             str(tmp_path / "cache"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.load(open(wd / "comigs_s1" / "results.json"))
    assert [u["user"] for u in res["users"]] == sorted(man["users"])
    assert res["test_ppl_distribution"]["final"]["p50"] == pytest.approx(
        float(np.median([u["test_ppl"] for u in res["users"]])), rel=1e-12)
    assert os.path.getsize(wd / "comigs_s1" / "test_ppl_histogram.png") > 1000


def test_group_table_matches_scipy():
    rng = np.random.default_rng(0)
    users, seeds = [f"u{i}" for i in range(5)], [0, 1, 2]
    groups = {"u0": "code", "u1": "code", "u2": "man-de", "u3": "man-de", "u4": "man-de"}
    per = {m: rng.uniform(5, 20, (3, 5)) for m in ("local", "fedavg", "comigs")}
    cell = {"users": users, "methods": {m: {"seeds": seeds, "per_seed": v.tolist()} for m, v in per.items()}}
    rows = {r["group"]: r for r in report.group_table(cell, groups)}
    assert [rows[g]["n_users"] for g in ("code", "man-de", "all")] == [2, 3, 5]
    for g, idx in (("code", [0, 1]), ("man-de", [2, 3, 4]), ("all", [0, 1, 2, 3, 4])):
        for p in rows[g]["verdict"]["pairs"]:
            a, b = per[p["a"]][:, idx].mean(1), per[p["b"]][:, idx].mean(1)
            ci = stats.ttest_rel(a, b).confidence_interval(0.95)
            assert p["diff"] == pytest.approx(float((a - b).mean()), rel=1e-12)
            assert p["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-10)
        m = per["comigs"][:, idx].mean(1)
        assert rows[g]["methods"]["comigs"]["mean"] == pytest.approx(m.mean(), rel=1e-12)
    lines = report.markdown(list(rows.values()), {"users": {u: {"group": g, "tokens": 100} for u, g in groups.items()}})
    assert len(lines) == 2 + 3 and "| man-de | de | man | 3 | 100 |" in lines[3]


def test_report_writes_groups_table_and_figure(tmp_path):
    study, corpus = tmp_path / "study", tmp_path / "corpus"
    study.mkdir(), corpus.mkdir()
    rng = np.random.default_rng(1)
    users = ["code.a", "code.b", "man-de.c"]
    methods = {m: {"seeds": [0, 1, 2], "per_seed": rng.uniform(5, 9, (3, 3)).tolist()} for m in ("local", "comigs")}
    json.dump({"study": "many_users", "description": "d", "cells": [{"name": "all", "users": users, "methods": methods}]},
              open(study / "study.json", "w"))
    json.dump({"population": {"min_tokens": 10, "vocab": 300, "units": 5, "heldout_units": 2},
               "users": {u: {"group": u.split(".")[0], "tokens": 50} for u in users}}, open(corpus / "manifest.json", "w"))
    out = tmp_path / "docs" / "many_users.md"
    assert report.main([f"--study={study}", f"--corpus={corpus}", f"--out={out}", f"--assets={tmp_path / 'docs' / 'a'}"]) == 0
    text = out.read_text()
    assert "| code | python | code | 2 | 50 |" in text and "| all | all | all | 3 |" in text and "(a/groups.png)" in text
    assert os.path.getsize(tmp_path / "docs" / "a" / "groups.png") > 1000
    assert json.load(open(tmp_path / "docs" / "a" / "groups.json"))["groups"][-1]["n_users"] == 3


def test_text_base_is_keyed_on_its_text_and_tokenizer(population, tmp_path):
    import shutil
    from configs import many_users
    from comigs_jax.experiment.base_model import pretrained_base_dir
    out, _ = population
    c = many_users.get_config()
    text = tmp_path / "heldout"
    shutil.copytree(out / ".heldout", text)
    c.pretrain.text, c.data.tokenizer = str(text), str(out / ".tokenizer")
    first = pretrained_base_dir(c)
    assert pretrained_base_dir(c) == first
    with open(text / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more held-out document"}) + "\n")
    second = pretrained_base_dir(c)
    c.data.tokenizer = "gpt2"
    assert len({first, second, pretrained_base_dir(c)}) == 3
