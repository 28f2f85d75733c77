"""--config_help: every key of a command's config with its value and its one-line comment."""
import re

import pytest

from comigs_jax import capacity
from experiments import bench, run

LINE = re.compile(r"^([\w.]+) = (.+?)(?:  # (.+))?$")


@pytest.mark.parametrize("main, argv", [
    (run.main, ["--config=configs/smollm2_local.py", "--config.train.lr=0.0005"]),
    (run.main, ["--config=configs/slimpajama.py:comigs"]),
    (bench.main, []),
    (capacity.main, ["--config=configs/capacity.py:tiny"]),
])
def test_every_key_has_its_value_and_a_comment(main, argv, capsys):
    assert main(["prog", *argv, "--config_help"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = {}
    for line in out:
        m = LINE.match(line)
        assert m, line
        key, value, comment = m.groups()
        assert comment, f"{key} has no comment in the config files"
        rows[key] = (value, comment)
    if main is run.main and "smollm2" in argv[0]:
        assert rows["train.lr"][0] == "0.0005" and rows["base"][0] == "'smollm2-135m'"
        # configs/base.py's comment (it sets "base"), not comigs_jax/data/config.py's ("gpt2")
        assert rows["data.tokenizer"] == ("'base'", rows["data.tokenizer"][1]) and "base's own" in rows["data.tokenizer"][1]
        assert rows["data.cache_dir"][1].startswith("token caches")  # a data key: comigs_jax/data/config.py
    if main is bench.main:
        assert rows["tiny.train.lr"][1] == rows["mini.train.lr"][1]  # configs/base.py's train.lr, by suffix
