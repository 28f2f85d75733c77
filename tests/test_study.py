"""experiments.study: a tiny grid run in-process (study.json / .md against the cells' results.json,
mean and std by NumPy), resume without rerunning finished cells, every bad input as one line before
any run, another study's folder refused, and every configs/studies/*.py config valid."""
import glob
import json
import os
import re

import numpy as np
import pytest
from scipy import stats

from comigs_jax import cli, configuration
from comigs_jax.errors import WorkdirError
from comigs_jax.experiment import study
from comigs_jax.experiment.study import StudyError
from tiny import TOL64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_study(cache_dir, name="tiny_study", grid="train.lr=0.002|0.01", **over):
    c = cli.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    c.methods = "local"
    c.seeds = "0,1"
    c.federation.stack_seeds = True
    c.train.rounds = 2
    c.eval.every_rounds = 1
    c.output.figures = False
    c.data.cache_dir = cache_dir
    c.study = study.default_study_group(name)
    c.study.grid = grid
    c.update_from_flattened_dict(over)
    return c


def never(cfg, workdir):
    raise AssertionError("a run started")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_cache):
    from comigs_jax.experiment.loop import run
    wd = str(tmp_path_factory.mktemp("study") / "s")
    calls = []

    def runner(cfg, d):
        calls.append(d)
        return run(cfg, d)

    summary = study.run_study(tiny_study(tiny_cache), wd, runner=runner)
    return wd, summary, calls, tiny_cache


def test_study_outputs_match_the_cells_results(finished):
    wd, summary, calls, _ = finished
    assert len(calls) == 2
    for f in ("study.json", "study.md", "study.png", study.IDENTITY_FILE):
        assert os.path.getsize(os.path.join(wd, f)) > 0, f
    on_disk = json.load(open(os.path.join(wd, "study.json")))
    assert on_disk["cells"][0]["name"] == "lr=0.002" and on_disk["cells"][1]["name"] == "lr=0.01"
    md = open(os.path.join(wd, "study.md")).read()
    for cell in on_disk["cells"]:
        per_seed = np.array([[u["test_ppl"] for u in json.load(open(
            os.path.join(wd, "cells", cell["name"], f"local_s{s}", "results.json")))["users"]] for s in (0, 1)])
        row = cell["methods"]["local"]
        np.testing.assert_allclose(row["per_seed"], per_seed, rtol=1e-12)
        np.testing.assert_allclose(row["mean"], per_seed.mean(0), rtol=1e-12)
        np.testing.assert_allclose(row["std"], per_seed.std(0, ddof=1), rtol=1e-12)
        assert row["n_seeds"] == 2
        for u in range(per_seed.shape[1]):
            np.testing.assert_allclose(row["ci95"][u], stats.t.interval(0.95, 1, loc=per_seed[:, u].mean(),
                                                                        scale=stats.sem(per_seed[:, u])), rtol=1e-10)
        assert row["user_mean"] == pytest.approx(per_seed.mean(1).mean(), rel=1e-12)
        assert row["user_mean_std"] == pytest.approx(per_seed.mean(1).std(ddof=1), rel=1e-12)
        np.testing.assert_allclose(row["user_mean_ci95"], stats.t.interval(
            0.95, 1, loc=per_seed.mean(1).mean(), scale=stats.sem(per_seed.mean(1))), rtol=1e-10)
        assert cell["comparison"] is None  # one method per cell: the cells are compared
        bayes = np.array(row["bayes_ppl"])
        assert row["over_bayes"] == pytest.approx((per_seed / bayes).mean(), rel=1e-12)
        comm = json.load(open(os.path.join(wd, "cells", cell["name"], "local_s0", "results.json")))["communication"]
        assert row["communication_bytes_per_user"] == np.mean(np.add(comm["upload_bytes_float32"],
                                                                     comm["download_bytes_float32"]))
        assert f"{row['user_mean']:.3f} ± {row['user_mean_std']:.3f}" in md
        assert f"user0: {per_seed[:, 0].mean():.3f} ± {per_seed[:, 0].std(ddof=1):.3f}" in md
    assert on_disk["cells"][0]["values"] == {"train.lr": 0.002}
    # the two cells, paired by seed, as scipy's paired t-test sees them
    overall = [np.array(c["methods"]["local"]["per_seed"]).mean(1) for c in on_disk["cells"]]
    (pair,) = on_disk["across_cells"]["pairs"]
    ref = stats.ttest_rel(overall[0], overall[1]).confidence_interval(0.95)
    assert (pair["a"], pair["b"]) == ("lr=0.002", "lr=0.01") and on_disk["across_cells"]["seeds"] == [0, 1]
    assert pair["diff"] == pytest.approx((overall[0] - overall[1]).mean(), rel=1e-12)
    np.testing.assert_allclose(pair["ci95"], [ref.low, ref.high], rtol=1e-10)


def test_resume_does_not_rerun_finished_cells(finished):
    wd, _, _, cache = finished
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(wd, "cells", "*", "*", "results.json"))}
    assert len(mtimes) == 4
    first = json.load(open(os.path.join(wd, "study.json")))
    again = study.run_study(tiny_study(cache), wd, runner=never)  # finished: no run at all
    assert [c["name"] for c in again["cells"]] == ["lr=0.002", "lr=0.01"]
    assert [c["wall_s"] for c in again["cells"]] == [c["wall_s"] for c in first["cells"]]  # kept, not lost
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes
    # a grown grid runs only the new cell
    calls = []
    grown = study.run_study(tiny_study(cache, grid="train.lr=0.002|0.01|0.02"), wd,
                            runner=lambda cfg, d: calls.append(d) or __import__(
                                "comigs_jax.experiment.loop", fromlist=["run"]).run(cfg, d))
    assert [os.path.basename(d) for d in calls] == ["lr=0.02"]
    assert len(grown["cells"]) == 3


def test_one_program_equals_the_separate_cells(tiny_cache, tmp_path, x64):
    """study.one_program=True: both lr cells x 2 seeds as 4 federations of ONE program (lr a
    per-row value); every run's results equal the separately run cells', in the same folders,
    and a second call reruns nothing. Two programs: both in float64 (tests/tiny.py TOL64)."""
    from comigs_jax.experiment.loop import run, run_cells
    cache, f64 = tiny_cache, {"model.dtype": "float64"}
    summary = study.run_study(tiny_study(cache, **f64), str(tmp_path / "separate"), runner=run)
    calls = []
    one = str(tmp_path / "one")
    got = study.run_study(tiny_study(cache, **{"study.one_program": True, **f64}), one, runner=never,
                          cells_runner=lambda cells: calls.append(len(cells)) or run_cells(cells))
    assert calls == [2] and got["one_program_wall_s"] > 0
    for a, b in zip(summary["cells"], got["cells"]):
        assert a["name"] == b["name"]
        np.testing.assert_allclose(b["methods"]["local"]["per_seed"], a["methods"]["local"]["per_seed"], **TOL64)
    rounds = [json.loads(line) for line in open(os.path.join(one, "cells", "lr=0.01", "local_s1", "metrics.jsonl"))]
    assert rounds[0]["stacked_seeds"] == [0, 1, 0, 1] and rounds[0]["lr"] != pytest.approx(
        [json.loads(line) for line in open(os.path.join(one, "cells", "lr=0.002", "local_s1", "metrics.jsonl"))][0]["lr"])
    study.run_study(tiny_study(cache, **{"study.one_program": True, **f64}), one, runner=never,
                    cells_runner=lambda cells: never(cells, one))


def test_one_program_groups_the_cells_that_share_a_program(tmp_path):
    """study.one_program with a shape key and an lr axis: one program per rank, each holding both
    lr cells (the grid's order kept); nothing trains here (the runner records and returns)."""
    groups = []
    cfg = tiny_study(str(tmp_path / "cache"), grid="model.rank=2|4; train.lr=0.002|0.01",
                     **{"study.one_program": True})
    with pytest.raises(WorkdirError, match="finished without every run's results.json"):
        study.run_study(cfg, str(tmp_path / "wd"), runner=never,
                        cells_runner=lambda cells: groups.append([os.path.basename(d) for _, d in cells]))
    assert groups == [["rank=2__lr=0.002", "rank=2__lr=0.01"], ["rank=4__lr=0.002", "rank=4__lr=0.01"]]


def test_cells_of_one_program_differ_only_in_federation_keys(tmp_path):
    from comigs_jax.errors import ConfigError
    from comigs_jax.experiment.loop import run_cells
    a = study.strip_study(tiny_study(str(tmp_path / "cache")))
    b = a.copy_and_resolve_references()
    b.train.rounds = 3
    with pytest.raises(ConfigError, match=r"^cell .*b: config.train.rounds differs from the first cell's \(2, 3\); "
                                          r"cells of one program may differ only in seed, seeds, train.lr"):
        run_cells([(a, str(tmp_path / "a")), (b, str(tmp_path / "b"))])
    assert not (tmp_path / "a").exists() and not (tmp_path / "cache").exists()


def test_another_study_folder_is_refused(finished, tmp_path):
    wd, _, _, cache = finished
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(wd, "**"), recursive=True)}
    with pytest.raises(WorkdirError, match="holds the cells of another study .'tiny_study'"):
        study.run_study(tiny_study(cache, name="other"), wd, runner=never)
    with pytest.raises(WorkdirError, match=r"another config \(train.rounds: 2 there, 3 now"):
        study.run_study(tiny_study(cache, **{"train.rounds": 3}), wd, runner=never)
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(wd, "**"), recursive=True)} == before
    (tmp_path / "x.txt").write_text("not a study")
    with pytest.raises(WorkdirError, match="holds no study"):
        study.run_study(tiny_study(cache), str(tmp_path), runner=never)


@pytest.mark.parametrize("over, message", [
    ({"study.grid": "train.lrr=0.1|0.2"}, "study.grid: unknown config key 'train.lrr' (did you mean 'train.lr'?"),
    ({"study.grid": "train.rounds=3|many"}, "study.grid train.rounds='many' is not allowed: an integer"),
    ({"study.grid": "model.n_generalists=0|2"},
     "study.grid cell n_generalists=2: config.model.n_generalists=2 is not allowed: in [0, 1]"),
    ({"study.grid": "train=1|2"}, "study.grid key 'train' is a group, not a value"),
    ({"study.grid": "train.lr"}, "study.grid axis 'train.lr' is not allowed: KEY=V1|V2"),
    ({"study.grid": "model.n_experts&model.top_k=2&1|3"}, "value '3' is not allowed: 2 non-empty value(s)"),
    ({"study.grid": "data.synthetic.base_knows_shared=1|1.5"},
     "study.grid cell base_knows_shared=1.5: data.synthetic.base_knows_shared=1.5 is not allowed: a share in [0, 1]"),
    ({"seeds": "3"}, "config.seeds='3' is not allowed in a study that compares methods or cells (cell lr=0.002 "
                     "runs seed 3): at least 2"),
    ({"seeds": "1,1", "study.grid": "train.lr=0.002", "methods": "local,fedavg"}, "(cell lr=0.002 runs seed 1)"),
])
def test_bad_input_is_one_line_before_any_run(tmp_path, over, message):
    cfg = tiny_study(str(tmp_path / "cache"), **over)
    wd = tmp_path / "wd"
    with pytest.raises(StudyError) as e:
        study.run_study(cfg, str(wd), runner=never)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not wd.exists() and not (tmp_path / "cache").exists()


def test_one_seed_is_allowed_when_nothing_is_compared(tmp_path):
    cells = study.expand(tiny_study(str(tmp_path / "cache"), grid="train.lr=0.002", seeds="0"))
    assert len(cells) == 1


def test_cli_bad_grid_key_one_line(tmp_path, capsys):
    from experiments.study import main
    code = main(["prog", "--config=configs/studies/generalists.py", "--config.study.grid=model.n_generalist=0|1",
                 f"--workdir={tmp_path / 'wd'}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: study.grid: unknown config key 'model.n_generalist' (did you mean "
                          "'model.n_generalists'?")
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "studies", "[!_]*.py"))),
                         ids=os.path.basename)
def test_every_study_config_loads_and_validates(path, monkeypatch):
    cfg = cli.load_config_file(path)
    text = cfg.pretrain.get("text", "")
    if text and not os.path.isabs(text):  # a real-text study reads a corpus the repository does not ship
        monkeypatch.chdir(REPO)
        if not os.path.isdir(text):
            with pytest.raises(study.StudyError, match=r"prepare_local_corpus --many-users"):
                study.expand(cfg)  # the missing corpus is one line naming the command that builds it
            return
    cells = study.expand(cfg)  # validates every cell's config; runs nothing
    comparing = len(cells) >= 2 or len(configuration.methods_of(cells[0]["config"])) >= 2
    assert comparing and cfg.study.name == os.path.splitext(os.path.basename(path))[0]
    assert study.study_identity(cfg)["study"] == cfg.study.name


def test_train_shares_cut_each_users_training_split():
    from comigs_jax.data import load_user_data
    from comigs_jax.data.config import default_data_config
    c = default_data_config()
    c.train_tokens, c.valid_tokens, c.test_tokens, c.use_cache = 4000, 1000, 1000, False
    c.synthetic.vocab_size = 64
    full = load_user_data(c)
    c.train_shares = "0.25,0.5,1,1"
    cut = load_user_data(c)
    assert [len(a) for a in cut.train] == [1000, 2000, 4000, 4000]
    for a, b in zip(cut.train, full.train):
        np.testing.assert_array_equal(a, b[:len(a)])
    for s in ("valid", "test"):
        for a, b in zip(cut.split(s), full.split(s)):
            np.testing.assert_array_equal(a, b)
    for bad, why in (("0.5,1", "4 shares (data.n_users)"), ("0,1,1,1", "shares in (0, 1]"), ("a,1,1,1", "comma")):
        c.train_shares = bad
        with pytest.raises(ValueError, match="^" + re.escape(f"data.train_shares='{bad}' is not allowed: ") + ".*" + re.escape(why)):
            load_user_data(c)


def fake_results(cells, ppl):
    """{cell: {(method, seed): results.json-like}} from ppl[cell][method]: [seeds, users]."""
    out = {}
    for c in cells:
        out[c["name"]] = {}
        for m, table in ppl[c["name"]].items():
            for s, row in zip(study.configuration.seeds_of(c["config"]), table):
                out[c["name"]][m, s] = {"users": [{"test_ppl": v, "bayes_ppl": 5.0 + u} for u, v in enumerate(row)],
                                        "data": {"users": [f"user{u}" for u in range(len(row))]},
                                        "communication": {"upload_bytes_float32": [1.0] * len(row),
                                                          "download_bytes_float32": [1.0] * len(row)}}
    return out


# five seeds x two users per method; cell lr=0.002: a wins; cell lr=0.01: local and fedavg tie
FAKE = {"lr=0.002": {"local": [[30.1, 20.0], [30.4, 20.2], [29.9, 19.8], [30.2, 20.1], [30.0, 20.0]],
                     "fedavg": [[30.9, 21.0], [31.3, 21.1], [30.6, 20.7], [31.0, 21.0], [30.8, 20.9]]},
        "lr=0.01": {"local": [[30.1, 20.0], [30.4, 20.2], [29.9, 19.8], [30.2, 20.1], [30.0, 20.0]],
                    "fedavg": [[30.3, 19.9], [30.2, 20.4], [30.0, 19.6], [30.5, 20.0], [29.9, 20.2]]}}


def test_summary_compares_the_methods_of_a_cell_paired_by_seed(tmp_path):
    from comigs_jax.experiment import study_report
    cfg = tiny_study(str(tmp_path / "cache"), methods="local,fedavg", seeds="0,1,2,3,4",
                     **{"study.grid": "train.lr=0.002|0.01; train.rounds=2", "study.figure": "win_map"})
    cells = study.expand(cfg)
    fake = {c["name"]: FAKE[c["name"].split("__")[0]] for c in cells}
    summary = study_report.summarise(cfg, cells, fake_results(cells, fake), [])
    assert summary["across_cells"] is None
    for c in summary["cells"]:
        local, fedavg = (np.array(fake[c["name"]][m]) for m in ("local", "fedavg"))
        (pair,) = c["comparison"]["pairs"]
        ref = stats.ttest_rel(local.mean(1), fedavg.mean(1))
        assert (pair["a"], pair["b"]) == ("local", "fedavg")
        np.testing.assert_allclose(pair["ci95"], list(ref.confidence_interval(0.95)), rtol=1e-10)
        for u in range(2):
            np.testing.assert_allclose(pair["per_user"][u]["ci95"],
                                       list(stats.ttest_rel(local[:, u], fedavg[:, u]).confidence_interval(0.95)),
                                       rtol=1e-10)
        detected = ref.pvalue < 0.05
        assert c["comparison"]["winner"] == ("local" if detected else None)
        assert c["comparison"]["tied"] == (["local"] if detected else ["local", "fedavg"])
    assert [c["comparison"]["winner"] for c in summary["cells"]] == ["local", None]  # the fixed numbers' cases
    md = study_report.markdown(summary)
    assert "| lr=0.002__rounds=2 | local **wins** |" in md and "| lr=0.01__rounds=2 | fedavg (tied) |" in md
    study_report.write_outputs(str(tmp_path), summary, cfg)  # the win map draws the tie
    assert os.path.getsize(tmp_path / "study.png") > 0
    few = study_report.markdown({**summary, "per_user_limit": 1})  # 2 users: above the limit, none listed
    assert "user0: " not in few and "| 2 users (above output.per_user_limit): in study.json |" in few
    assert "user0: " in md


def test_findings_are_generated_from_study_json(tmp_path):
    """study.md's findings section: per cell its outcome and every pair as a sentence, the numbers
    those of scipy's paired t interval; written from study.json's content alone."""
    from comigs_jax.experiment import study_interactions, study_report
    cfg = tiny_study(str(tmp_path / "cache"), methods="local,fedavg", seeds="0,1,2,3,4")
    cells = study.expand(cfg)
    study_report.write_outputs(str(tmp_path), study_report.summarise(cfg, cells, fake_results(cells, FAKE), []), cfg)
    md = open(tmp_path / "study.md").read()
    on_disk = json.load(open(tmp_path / "study.json"))
    assert md.endswith("\n".join(study_report.findings(on_disk) + [""] + study_report.per_method_findings(on_disk)
                                  + [""] + study_interactions.findings(on_disk)) + "\n")
    f = lambda v: f"{v:.3f}"
    lines = []
    for name in ("lr=0.002", "lr=0.01"):
        local, fedavg = (np.array(FAKE[name][m]).mean(1) for m in ("local", "fedavg"))
        ref = stats.ttest_rel(local, fedavg)
        lo, hi = ref.confidence_interval(0.95)
        d = (local - fedavg).mean()
        if ref.pvalue < 0.05:
            assert hi < 0  # local lower
            lines += [f"- **cell {name}** (5 seeds): local wins.", f"  - local beats fedavg by {f(-d)} [{f(-hi)}, {f(-lo)}]"]
        else:
            lines += [f"- **cell {name}** (5 seeds): tie: local, fedavg.",
                      f"  - no detectable difference between local and fedavg (CI [{f(lo)}, {f(hi)}] of local − fedavg)"]
    assert "## Findings" in md and "\n".join(lines) in md
    assert "local wins" in md and "no detectable difference" in md  # both cases of the fixed numbers
    # a study of one method per cell compares its cells
    cfg1 = tiny_study(str(tmp_path / "cache"), seeds="0,1,2,3,4")
    cells1 = study.expand(cfg1)
    s1 = study_report.summarise(cfg1, cells1, fake_results(cells1, {k: {"local": v["fedavg"]} for k, v in FAKE.items()}), [])
    found = study_report.findings(s1)
    a, b = (np.array(FAKE[k]["fedavg"]).mean(1) for k in ("lr=0.002", "lr=0.01"))
    lo, hi = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert found[-2] == "- **across the cells (one method each)** (5 seeds): lr=0.01 wins."
    assert found[-1] == f"  - lr=0.01 beats lr=0.002 by {f((a - b).mean())} [{f(lo)}, {f(hi)}]"


def test_tune_compares_each_method_at_its_best_value(tmp_path):
    """study.tune: per combination of the other axes, each method at its own best lr (lowest mean
    over seeds), compared there paired by seed; the findings and the win map use those rows."""
    from comigs_jax.experiment import statistics, study_report
    cfg = tiny_study(str(tmp_path / "cache"), methods="local,fedavg", seeds="0,1,2,3,4",
                     **{"study.grid": "train.rounds=2|3; train.lr=0.002|0.01; train.local_steps=2|3",
                        "study.tune": "train.lr", "study.figure": "win_map", "study.per_user_findings": True})
    cells = study.expand(cfg)
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 0.3, (5, 1))
    ppl = {}
    for c in cells:  # local is best at lr 0.01, fedavg at 0.002
        lr = c["values"]["train.lr"]
        ppl[c["name"]] = {"local": (30 + (lr == 0.002) + seed_effect + rng.normal(0, 0.05, (5, 2))).tolist(),
                          "fedavg": (30.3 + (lr == 0.01) + seed_effect + rng.normal(0, 0.05, (5, 2))).tolist()}
    summary = study_report.summarise(cfg, cells, fake_results(cells, ppl), [])
    tuned = summary["tuned"]["cells"]
    assert [c["name"] for c in tuned] == ["rounds=2__local_steps=2", "rounds=2__local_steps=3",
                                          "rounds=3__local_steps=2", "rounds=3__local_steps=3"]
    for t in tuned:
        assert t["picked"] == {"local": "0.01", "fedavg": "0.002"}
        name = lambda lr: f"rounds={t['shown']['train.rounds']}__lr={lr}__local_steps={t['shown']['train.local_steps']}"
        local, fedavg = np.array(ppl[name("0.01")]["local"]), np.array(ppl[name("0.002")]["fedavg"])
        ref = statistics.verdict({"local": local.mean(1), "fedavg": fedavg.mean(1)})
        assert (t["comparison"]["winner"], t["comparison"]["tied"]) == (ref["winner"], ref["tied"])
        np.testing.assert_allclose(t["comparison"]["pairs"][0]["ci95"],
                                   list(stats.ttest_rel(local.mean(1), fedavg.mean(1)).confidence_interval()), rtol=1e-10)
    found = study_report.findings(summary)
    assert sum(line.startswith("- **cell ") for line in found) == 4  # the tuned cells, not the 8 grid cells
    assert "- **cell rounds=2__local_steps=2, each method at its best train.lr (local 0.01, fedavg 0.002)** (5 seeds)" \
        in "\n".join(found)
    assert sum(line.startswith("    - user") for line in found) == 8  # per user: 2 users x 4 cells
    study_report.write_outputs(str(tmp_path), summary, cfg)
    assert "Each method at its own best `train.lr`" in open(tmp_path / "study.md").read()
    with pytest.raises(StudyError, match=r"^config.study.tune='train.rank' is not allowed: the key of a grid axis"):
        study.expand(tiny_study(str(tmp_path / "cache"), **{"study.tune": "train.rank"}))


def test_win_map_margin_is_the_closest_pair():
    from comigs_jax.experiment.study_figure import _margin
    comp = {"winner": "comigs", "pairs": [
        {"a": "local", "b": "comigs", "diff": 0.2, "ci95": [0.1, 0.3]},
        {"a": "comigs", "b": "fedavg", "diff": -0.9, "ci95": [-1.0, -0.8]},
        {"a": "local", "b": "fedavg", "diff": -0.7, "ci95": [-0.8, -0.6]}]}
    assert _margin(comp) == "by 0.200 [0.100, 0.300]\nover local"
    comp["pairs"][0] = {"a": "comigs", "b": "local", "diff": -0.2, "ci95": [-0.3, -0.1]}
    assert _margin(comp) == "by 0.200 [0.100, 0.300]\nover local"


def test_a_study_folder_from_before_an_added_key_resumes(finished):
    """identity.ADDED_KEYS: a study_identity.json written before data.synthetic.base_knows_shared
    and target_share_shift existed matches a config that keeps their defaults, and no other."""
    wd, _, _, cache = finished
    path = os.path.join(wd, study.IDENTITY_FILE)
    ident = json.load(open(path))
    for k in ("data.synthetic.base_knows_shared", "data.synthetic.target_share_shift"):
        del ident["config"][k]
    json.dump(ident, open(path, "w"))
    study.run_study(tiny_study(cache), wd, runner=never)  # finished: summarised again, nothing run
    with pytest.raises(WorkdirError, match=r"data.synthetic.base_knows_shared: 1.0 there, 0.5 now"):
        study.run_study(tiny_study(cache, **{"data.synthetic.base_knows_shared": 0.5}), wd, runner=never)


def test_compare_without_common_seeds_or_users():
    from comigs_jax.experiment.study_report import compare
    row = lambda seeds, users: {"seeds": seeds, "per_seed": np.arange(len(seeds) * users, dtype=float).reshape(
        len(seeds), users).tolist()}
    assert compare({"a": row([0, 1], 2), "b": row([2, 3], 2)}) is None  # nothing to pair
    got = compare({"a": row([0, 1, 2], 2), "b": row([1, 2], 4)})  # different users: overall only
    assert got["seeds"] == [1, 2] and "per_user" not in got["pairs"][0]
    assert compare({"a": row([0, 1], 2)}) is None
