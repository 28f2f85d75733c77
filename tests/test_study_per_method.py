"""study_report.per_method_across_cells: each method against itself between the cells that differ in
exactly one grid axis, paired by seed (differences and intervals against scipy.stats on hand-built
per-seed arrays; only one-axis pairs; cells of other seeds not paired), and
`experiments.study --report=study.json`, which rewrites a study's outputs from its study.json alone."""
import itertools
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from comigs_jax.experiment import statistics, study, study_report
from test_study import fake_results, tiny_study

GRID = "train.lr=0.002|0.01|0.02; train.local_steps&train.rounds=2&2|3&3"


@pytest.fixture
def made(tmp_path):
    """A study of 2 methods x 6 cells x 5 seeds x 2 users with hand-built perplexities: a shared seed
    effect (what pairing removes), an effect of lr per method, noise."""
    cfg = tiny_study(str(tmp_path / "cache"), methods="local,fedavg", seeds="0,1,2,3,4", **{"study.grid": GRID})
    cells = study.expand(cfg)
    rng = np.random.default_rng(3)
    seed_effect = rng.normal(0, 1.0, (5, 1))
    ppl = {c["name"]: {m: (30 + k * (c["values"]["train.lr"] == 0.01) + seed_effect + rng.normal(0, 0.2, (5, 2))).tolist()
                       for k, m in enumerate(("local", "fedavg"))} for c in cells}
    return cfg, cells, ppl, study_report.summarise(cfg, cells, fake_results(cells, ppl), [])


def _reference_sentence(a_name, b_name, a, b):
    """The finding of a paired difference written from scipy: ttest_rel's interval, t.ppf's half width."""
    d = a - b
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    lo, hi = stats.ttest_rel(a, b).confidence_interval(0.95)
    np.testing.assert_allclose([lo, hi], [d.mean() - half, d.mean() + half], rtol=1e-12)
    f = "{:.3f}".format
    if hi < 0:
        return f"{a_name} beats {b_name} by {f(-d.mean())} [{f(-hi)}, {f(-lo)}]"
    if lo > 0:
        return f"{b_name} beats {a_name} by {f(d.mean())} [{f(lo)}, {f(hi)}]"
    return f"no detectable difference between {a_name} and {b_name} (CI [{f(lo)}, {f(hi)}] of {a_name} − {b_name})"


def test_each_method_is_compared_between_cells_of_one_axis_like_scipy(made):
    cfg, cells, ppl, summary = made
    per = summary["per_method_across_cells"]
    assert summary["across_cells"] is None and per["skipped"] == []
    axes = [("train.lr",), ("train.local_steps", "train.rounds")]
    # every pair of cells differing in exactly one axis, found from the cells' grid values alone
    expected = set()
    for m, (x, y) in itertools.product(("local", "fedavg"), itertools.combinations(cells, 2)):
        differ = [ks for ks in axes if any(x["shown"][k] != y["shown"][k] for k in ks)]
        if len(differ) == 1:
            expected.add((m, "&".join(differ[0]), x["name"], y["name"]))
    got = {(b["method"], b["axis"], b["cells"][p["a"]], b["cells"][p["b"]])
           for b in per["blocks"] for p in b["comparison"]["pairs"]}
    assert got == expected and len(got) == 2 * (2 * 3 + 3 * 1)  # lr: 2 lines of 3 cells; steps&rounds: 3 of 2
    md = study_report.markdown(summary)
    for b in per["blocks"]:
        others = [k for ks in axes if "&".join(ks) != b["axis"] for k in ks]
        members = [c for c in cells if c["name"] in b["cells"].values()]
        assert all(c["shown"][k] == b["at"][k] for c in members for k in others)
        for p in b["comparison"]["pairs"]:
            a, c = (np.array(ppl[b["cells"][arm]][b["method"]]) for arm in (p["a"], p["b"]))
            ref = stats.ttest_rel(a.mean(1), c.mean(1))
            np.testing.assert_allclose(p["diff"], (a.mean(1) - c.mean(1)).mean(), rtol=1e-12)
            np.testing.assert_allclose(p["ci95"], list(ref.confidence_interval(0.95)), rtol=1e-10)
            for u in range(2):
                np.testing.assert_allclose(p["per_user"][u]["ci95"],
                                           list(stats.ttest_rel(a[:, u], c[:, u]).confidence_interval(0.95)), rtol=1e-10)
            assert _reference_sentence(p["a"], p["b"], a.mean(1), c.mean(1)) in md
    assert {statistics.beats(p) != 0 for b in per["blocks"] for p in b["comparison"]["pairs"]} == {True, False}
    section = md[md.index("## Findings per method across cells"):]
    assert "### local" in section and "### fedavg" in section and "- **along `train.lr`**" in section
    assert "  - at local_steps=2__rounds=2 (5 seeds): " in section  # a line of 3 cells: its outcome, then pairs
    assert "  - at lr=0.002 (5 seeds): " in section  # a line of 2 cells: its one sentence


def test_pairs_by_seed_and_skips_cells_of_other_seeds(made):
    _, cells, ppl, summary = made
    name = lambda lr, s: f"lr={lr}__local_steps={s}__rounds={s}"
    first = json.loads(json.dumps(summary["per_method_across_cells"]))
    # the same seeds in another order (rows reordered with them) pair the same way
    row = next(c for c in summary["cells"] if c["name"] == name("0.01", 2))["methods"]["local"]
    row["seeds"], row["per_seed"] = row["seeds"][::-1], row["per_seed"][::-1]
    assert study_report.with_comparisons(summary)["per_method_across_cells"] == first
    # other seeds: that cell is paired with no cell of other seeds, and the lines say so
    row["seeds"] = [0, 1, 2, 3, 9]
    per = study_report.with_comparisons(summary)["per_method_across_cells"]
    local = [b for b in per["blocks"] if b["method"] == "local"]
    assert all(name("0.01", 2) not in b["cells"].values() for b in local)
    assert {(s["method"], s["axis"]) for s in per["skipped"]} == {("local", "train.lr"),
                                                                   ("local", "train.local_steps&train.rounds")}
    lr_line = next(s for s in per["skipped"] if s["axis"] == "train.lr")
    assert lr_line["seeds"] == {"0,1,2,3,4": [name("0.002", 2), name("0.02", 2)], "0,1,2,3,9": [name("0.01", 2)]}
    # the two cells left in the lr line are still compared, and fedavg is untouched
    assert any(set(b["cells"].values()) == {name("0.002", 2), name("0.02", 2)} for b in local)
    assert [b for b in per["blocks"] if b["method"] == "fedavg"] == [b for b in first["blocks"] if b["method"] == "fedavg"]
    md = study_report.markdown(summary)
    assert (f"- local along `train.lr` at local_steps=2__rounds=2: seeds 0,1,2,3,4: {name('0.002', 2)}, "
            f"{name('0.02', 2)}; seeds 0,1,2,3,9: {name('0.01', 2)}") in md


def test_one_method_per_cell_keeps_across_cells(tmp_path):
    cfg = tiny_study(str(tmp_path / "cache"), seeds="0,1,2", **{"study.grid": GRID})
    cells = study.expand(cfg)
    ppl = {c["name"]: {"local": (30 + np.arange(6).reshape(3, 2) * 0.1 + i).tolist()} for i, c in enumerate(cells)}
    summary = study_report.summarise(cfg, cells, fake_results(cells, ppl), [])
    assert summary["per_method_across_cells"] is None and len(summary["across_cells"]["pairs"]) == 15
    assert "## Findings per method across cells" not in study_report.markdown(summary)


def test_report_rewrites_the_outputs_from_study_json(made, tmp_path, capsys):
    from experiments.study import main
    cfg, _, _, summary = made
    old = json.loads(json.dumps(summary))
    for k in ("per_method_across_cells", "figure"):  # a study.json from before these keys
        del old[k]
    for c in old["cells"]:
        c["comparison"] = None
    path = tmp_path / "participation.json"
    path.write_text(json.dumps(old, indent=1))
    assert main(["prog", f"--report={path}"]) == 0
    assert json.loads(path.read_text()) == json.loads(json.dumps(summary))  # "figure": no config of that name: lines
    assert (tmp_path / "participation.md").read_text() == study_report.markdown(summary)
    assert os.path.getsize(tmp_path / "participation.png") > 0
    assert study_report._figure_of({"study": "where_comigs_wins"}) == "win_map"  # its shipped config's
    capsys.readouterr()
    for bad, why in ((tmp_path / "x.json", "(not JSON)"), (tmp_path / "missing.json", "(cannot be read: "),
                     (tmp_path / "y.json", "(no 'cells' key)")):
        if bad.name == "x.json":
            bad.write_text("not json")
        if bad.name == "y.json":
            bad.write_text(json.dumps({k: v for k, v in summary.items() if k != "cells"}))
        assert main(["prog", f"--report={bad}"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --report={bad} is not a study.json {why}")
        assert not (tmp_path / (bad.stem + ".md")).exists()
    assert main(["prog", f"--report={path}", f"--workdir={tmp_path}"]) == 1
    assert capsys.readouterr().err.startswith(f"error: --report={path} is not allowed: not with --workdir=")
