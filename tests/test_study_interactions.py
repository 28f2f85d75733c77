"""study_interactions: whether two methods change differently between two cells of one axis, paired
by seed (the difference of their changes and its interval against scipy.stats on hand-built
per-seed arrays with a known interaction; only one-axis pairs; the words follow the interval)."""
import itertools

import numpy as np
import pytest
from scipy import stats

from comigs_jax.experiment import study, study_interactions, study_report
from test_study import fake_results, tiny_study

GRID = "train.lr=0.002|0.01|0.02; train.local_steps&train.rounds=2&2|3&3"
AXES = [("train.lr",), ("train.local_steps", "train.rounds")]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """3 methods x 6 cells x 5 seeds x 2 users: a seed effect shared by every cell and method (what the
    pairing removes), fedavg 2.0 worse at lr 0.01 than elsewhere (an interaction with the lr axis that
    local and comigs do not have), comigs 0.5 better everywhere (no interaction), noise 0.1."""
    cfg = tiny_study(str(tmp_path_factory.mktemp("cache")), methods="local,fedavg,comigs", seeds="0,1,2,3,4",
                     **{"study.grid": GRID})
    cells = study.expand(cfg)
    rng = np.random.default_rng(7)
    seed_effect = rng.normal(0, 1.0, (5, 1))
    shift = {"local": lambda c: 0.0, "comigs": lambda c: -0.5,
             "fedavg": lambda c: 2.0 * (c["values"]["train.lr"] == 0.01)}
    ppl = {c["name"]: {m: (30 + f(c) + seed_effect + rng.normal(0, 0.1, (5, 2))).tolist() for m, f in shift.items()}
           for c in cells}
    return cells, ppl, study_report.summarise(cfg, cells, fake_results(cells, ppl), [])


def _mean(ppl, cell, m):
    return np.asarray(ppl[cell][m]).mean(axis=1)


def test_the_difference_of_changes_is_scipys_paired_interval(made):
    cells, ppl, summary = made
    found = summary["interactions"]
    by_name = {c["name"]: c for c in cells}
    expected = set()  # every pair of one-axis cells x every pair of methods, from the grid values alone
    for x, y in itertools.combinations(cells, 2):
        if sum(any(x["shown"][k] != y["shown"][k] for k in ks) for ks in AXES) == 1:
            expected |= {frozenset([x["name"], y["name"], a, b])
                         for a, b in itertools.combinations(("local", "fedavg", "comigs"), 2)}
    arms = {b["axis"]: {} for b in summary["per_method_across_cells"]["blocks"]}
    for b in summary["per_method_across_cells"]["blocks"]:
        arms[b["axis"]].update({(a, tuple(sorted(b["at"].items()))): c for a, c in b["cells"].items()})
    got = set()
    for it in found:
        at = tuple(sorted(it["at"].items()))
        cx, cy = arms[it["axis"]][it["x"], at], arms[it["axis"]][it["y"], at]
        assert by_name[cx]["shown"] != by_name[cy]["shown"]
        got.add(frozenset([cx, cy, it["a"], it["b"]]))
        da = _mean(ppl, cy, it["a"]) - _mean(ppl, cx, it["a"])
        db = _mean(ppl, cy, it["b"]) - _mean(ppl, cx, it["b"])
        np.testing.assert_allclose([it["change_a"], it["change_b"], it["diff"]],
                                   [da.mean(), db.mean(), (da - db).mean()], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(it["ci95"], list(stats.ttest_rel(da, db).confidence_interval(0.95)), rtol=1e-9)
        # the built-in effect: only pairs of lr cells with one at 0.01 and fedavg as one method interact
        lrs = {by_name[c]["values"]["train.lr"] for c in (cx, cy)}
        real = it["axis"] == "train.lr" and 0.01 in lrs and "fedavg" in (it["a"], it["b"])
        lo, hi = it["ci95"]
        assert (lo > 0 or hi < 0) == real, it  # an effect of 2.0 against noise of 0.1: found iff real
    assert got == expected and len(found) == 3 * (2 * 3 + 3 * 1)


def test_the_words_follow_the_interval():
    base = {"axis": "k", "at": {}, "x": "k=1", "y": "k=2", "a": "fedavg", "b": "comigs", "n_seeds": 5, "std": 1.0}
    s = study_interactions.sentence
    assert s({**base, "change_a": 4.157, "change_b": 2.563, "diff": 1.594, "ci95": [1.1, 2.0]}) == (
        "from k=1 to k=2, fedavg changes by +4.157 and comigs by +2.563: fedavg's change minus comigs's is +1.594 "
        "[+1.100, +2.000]")
    assert s({**base, "change_a": -1.0, "change_b": 0.5, "diff": -1.5, "ci95": [-2.0, -1.0]}).endswith(
        "fedavg changes by -1.000 and comigs by +0.500: fedavg's change minus comigs's is -1.500 [-2.000, -1.000]")
    assert s({**base, "change_a": 1.0, "change_b": 0.9, "diff": 0.1, "ci95": [-0.2, 0.4]}).endswith(
        ": no detectable difference between the changes (CI [-0.200, 0.400] of fedavg's − comigs's)")


def test_markdown_section_and_none_without_two_methods(made, tmp_path):
    _, _, summary = made
    md = study_report.markdown(summary)
    section = md[md.index("## Findings: do two methods change differently between cells?"):]
    assert all(f"  - {study_interactions.sentence(it)}" in section for it in summary["interactions"])
    assert "- **along `train.lr`**, at local_steps=2__rounds=2 (5 seeds):" in section
    cfg = tiny_study(str(tmp_path / "cache"), methods="local", seeds="0,1,2", **{"study.grid": GRID})
    cells = study.expand(cfg)
    one = {c["name"]: {"local": (30 + np.arange(6).reshape(3, 2) * 0.1 + i).tolist()} for i, c in enumerate(cells)}
    alone = study_report.summarise(cfg, cells, fake_results(cells, one), [])
    assert alone["interactions"] is None and "change differently" not in study_report.markdown(alone)


def test_one_methods_two_axis_contrast_is_scipys_and_found_iff_built_in(tmp_path):
    """fedavg 2.0 worse only where lr = 0.01 and local_steps = 3 (an lr x steps interaction); local
    without one: the contrast (m[x2,y2] - m[x1,y2]) - (m[x2,y1] - m[x1,y1]) against scipy, found iff real."""
    cfg = tiny_study(str(tmp_path / "cache"), methods="local,fedavg", seeds="0,1,2,3,4", **{"study.grid": GRID})
    cells = study.expand(cfg)
    rng = np.random.default_rng(11)
    seed_effect = rng.normal(0, 1.0, (5, 1))
    bump = lambda c, m: 2.0 * (m == "fedavg" and c["values"]["train.lr"] == 0.01 and c["values"]["train.local_steps"] == 3)
    ppl = {c["name"]: {m: (30 + bump(c, m) + seed_effect + rng.normal(0, 0.1, (5, 2))).tolist()
                       for m in ("local", "fedavg")} for c in cells}
    summary = study_report.summarise(cfg, cells, fake_results(cells, ppl), [])
    found = summary["two_axes"]
    by = {(c["values"]["train.lr"], c["values"]["train.local_steps"]): c["name"] for c in cells}
    lrs = [0.002, 0.01, 0.02]
    assert len(found) == 2 * 3 and {it["axis"] for it in found} == {"train.lr"}
    assert {it["by"] for it in found} == {"train.local_steps&train.rounds"}
    md = study_report.markdown(summary)
    for it in found:
        (x1, x2), (y1, y2) = ([float(a.split("=")[1]) for a in it["x"]],
                              [int(a.split("__")[0].split("=")[1]) for a in it["y"]])
        assert (y1, y2) == (2, 3) and x1 in lrs and x2 in lrs and lrs.index(x1) < lrs.index(x2)
        m = lambda lr, s: _mean(ppl, by[lr, s], it["method"])
        at_y1, at_y2 = m(x2, y1) - m(x1, y1), m(x2, y2) - m(x1, y2)
        np.testing.assert_allclose([it["change_y1"], it["change_y2"], it["diff"]],
                                   [at_y1.mean(), at_y2.mean(), (at_y2 - at_y1).mean()], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(it["ci95"], list(stats.ttest_rel(at_y2, at_y1).confidence_interval(0.95)), rtol=1e-9)
        real = it["method"] == "fedavg" and 0.01 in (x1, x2)
        lo, hi = it["ci95"]
        assert (lo > 0 or hi < 0) == real, it
        assert f"  - {study_interactions.two_axes_sentence(it)}" in md
    assert "## Findings: does one axis's effect depend on another? (per method)" in md
    s = study_interactions.two_axes_sentence
    base = {"method": "comigs", "x": ["e=0", "e=2"], "y": ["none", "sgd"], "n_seeds": 5, "std": 1.0}
    assert s({**base, "change_y1": 2.563, "change_y2": 0.546, "diff": -2.017, "ci95": [-2.3, -1.7]}) == (
        "from e=0 to e=2, comigs changes by +2.563 at none and by +0.546 at sgd: at sgd minus at none is -2.017 "
        "[-2.300, -1.700]")
    assert s({**base, "change_y1": 1.0, "change_y2": 1.1, "diff": 0.1, "ci95": [-0.2, 0.4]}).endswith(
        ": no detectable difference between the changes (CI [-0.200, 0.400] of at sgd − at none)")
