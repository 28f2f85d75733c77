"""experiments/prepare_local_corpus.py: helpers, and a small run loaded through text_files."""
import json
import os

from comigs_jax.data import default_data_config, load_user_data
from experiments import prepare_local_corpus as plc


def test_chunk_and_english_filter():
    text = "\n\n".join(f"para {i} " + "x" * 50 for i in range(20))
    parts = plc.chunk(text, 200)
    assert all(len(p) <= 200 for p in parts) and "\n\n".join(parts) == text
    kept, k, d = plc.english_filter("Die Datei wird gelesen.\nThe file is read from the disk.\nEnde")
    assert kept == "Die Datei wird gelesen.\nEnde" and (k, d) == (2, 1)


def test_small_run_loads_as_text_files(tmp_path):
    out = tmp_path / "corpus"
    rc = plc.main(["--out", str(out), "--users", "code", "--max-mb", "0.15", "--chunk-kb", "4"])
    assert rc == 1  # a single user is not a federation, but its folder is written
    man = json.load(open(out / "manifest.json"))
    assert man["users"]["code"]["documents"] > 10 and os.listdir(out / "code")
    c = default_data_config()
    c.source, c.n_users, c.progress = "text_files", 1, False
    c.text_files.root = str(out)
    c.cache_dir = str(tmp_path / "cache")
    c.train_tokens, c.valid_tokens, c.test_tokens = 20_000, 4000, 4000
    d = load_user_data(c)
    assert d.users == ["code"] and len(d.train[0]) == 20_000
