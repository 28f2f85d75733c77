"""`python -m experiments.generate` on the session's finished tiny run (conftest.tiny_reference):
a user's personalised model samples, colours its tokens by generalist weight (ANSI, HTML), and
bad input is one line before any compile."""
import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

from comigs_jax.experiment import generation
from experiments import generate


def run_cli(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = generate.main(["experiments.generate", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tiny_reference):
    wd = tiny_reference[0]
    with open(os.path.join(wd, "results.json")) as f:
        users = [u["user"] for u in json.load(f)["users"]]
    return wd, users


def test_generates_coloured_text_and_html(finished, tmp_path):
    wd, users = finished
    page = str(tmp_path / "sample.html")
    code, out, err = run_cli([f"--workdir={wd}", f"--user={users[1]}", "--prompt", "3 1 4 1", "--tokens=8",
                              "--temperature=0.8", "--top_k=5", "--seed=3", "--color=always", f"--html={page}"])
    assert code == 0, err
    assert out.count("\x1b[48;2;") == 12 and out.rstrip().endswith("\x1b[0m")  # 4 prompt + 8 new tokens
    plain = run_cli([f"--workdir={wd}", f"--user={users[1]}", "--prompt", "3 1 4 1", "--tokens=8",
                     "--temperature=0.8", "--top_k=5", "--seed=3", "--color=never"])[1].split()
    assert plain[:4] == ["3", "1", "4", "1"] and len(plain) == 12 and all(0 <= int(t) < 64 for t in plain)
    text = open(page).read()
    assert text.count("<span") == 12 and text.count("generalist weight") == 12


def test_the_users_model(finished):
    wd, users = finished
    models = [generation.load_user_model(wd, u) for u in users[:2]]
    flat = [dict(jax.tree_util.tree_flatten_with_path(m.params)[0]) for m in models]
    gen = [k for k in flat[0] if "generalists" in jax.tree_util.keystr(k)]
    spec = [k for k in flat[0] if "specialists" in jax.tree_util.keystr(k) and jax.tree_util.keystr(k).endswith("_B']")]
    assert gen and spec
    for k in gen:  # the last checkpoint is after the final aggregation: one generalist for all
        np.testing.assert_array_equal(flat[0][k], flat[1][k])
    assert any(not np.array_equal(flat[0][k], flat[1][k]) for k in spec)  # each user's own specialists
    out = models[0].generate("5 6", n_new=6, temperature=0.0)
    assert out.tokens[:2].tolist() == [5, 6] and len(out.tokens) == 8
    assert out.generalist_weight.shape == (8,) and np.all((0 <= out.generalist_weight) & (out.generalist_weight <= 1))
    again = models[0].generate("5 6", n_new=6, temperature=1.0, top_k=1, seed=9)  # top-1 is greedy
    assert again.tokens.tolist() == out.tokens.tolist()


def test_bad_input_is_one_line(finished, tmp_path):
    wd, users = finished
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([f"--workdir={empty}", "--user=user0"], "holds no finished run"),
        ([f"--workdir={wd}", "--user=nobody"], f"unknown user 'nobody': this run's users are {', '.join(users)}"),
        ([f"--workdir={wd}", f"--user={users[0]}", "--prompt", " ".join(["1"] * 16)],
         "the prompt has 16 tokens, the model's context is 16"),
        ([f"--workdir={wd}", f"--user={users[0]}", "--prompt", "1 2", "--tokens=15"], "exceed the model's context"),
        ([f"--workdir={wd}", f"--user={users[0]}", "--prompt", "hello"], "space-separated integers"),
        ([f"--user={users[0]}"], "--workdir and --user are required"),
    ]
    for args, what in cases:
        code, out, err = run_cli(args)
        assert code == 1 and out == "", (args, out)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], (args, err)
