"""The README's notebook snippet, run exactly as printed: the library API a researcher uses."""
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    m = re.search(r"<!-- notebook-snippet[^>]*-->\s*```python\n(.*?)```\s*<!-- /notebook-snippet -->", text, re.S)
    assert m, "README.md lost its notebook snippet"
    return m.group(1)


def test_readme_snippet_is_short():
    assert len(readme_snippet().strip().splitlines()) <= 12


def test_readme_snippet_runs_and_returns_the_results_it_writes(tmp_path, monkeypatch, tiny_cache):
    monkeypatch.chdir(tmp_path)  # the snippet's relative runs/notebook
    # its default cache, ~/.cache/comigs_jax/data, is the session's tiny cache (the base is pretrained once)
    os.makedirs(tmp_path / "home" / ".cache" / "comigs_jax")
    os.symlink(tiny_cache, tmp_path / "home" / ".cache" / "comigs_jax" / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    scope = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    results = scope["results"]
    assert list(results) == [("comigs", 0)]  # configs/demo.py: seed 0
    for (method, seed), res in results.items():
        on_disk = json.load(open(tmp_path / "runs" / "notebook" / "results.json"))  # one run: the workdir itself
        assert res == on_disk  # the returned results are results.json's content
        assert len(res["users"]) == 3 and all(u["test_ppl"] > u["bayes_ppl"] for u in res["users"])
    assert os.path.getsize(tmp_path / "runs" / "notebook" / "ppl.png") > 0
    assert os.path.getsize(tmp_path / "runs" / "notebook" / "loss_curves.png") > 0  # the run's own figures


def test_run_raises_typed_errors_and_leaves_the_config_alone(tmp_path):
    from comigs_jax import experiment
    from comigs_jax.errors import ConfigError, WorkdirError
    from configs import tiny
    cfg = tiny.get_config()
    cfg.model.top_k = 3
    with pytest.raises(ConfigError, match=r"config.model.top_k=3 is not allowed"):
        experiment.run(cfg, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
    cfg = tiny.get_config()
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match=r"a part of the path is a regular file"):
        experiment.run(cfg, str(tmp_path / "file" / "wd"))
    assert cfg.data.min_tokens == tiny.get_config().data.min_tokens  # run works on a copy
