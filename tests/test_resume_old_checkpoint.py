"""A workdir written by the code before the server interface (main at ca94b6e) resumes: the tiny
config's FlexLoRA run (model.rank 8, ranks 8, 6, 7: a server with state, the ranks in the host
state), stopped after round 3 with its round-2 checkpoint, is resumed by today's code and ends
where that code's uninterrupted run ended (its results.json and metrics.jsonl, kept beside it).
(The fixture was a HetLoRA run until issue 29 changed HetLoRA's rule, whose old checkpoints now
lack the server's pre-aggregation tails and are refused in one line; it was rewritten with
ca94b6e's code, on the same pretrained base, for FlexLoRA, whose rule has not changed.)

tests/assets/resume_ca94b6e/: run/ (config.json, hosts.json, the first 3 lines of metrics.jsonl,
checkpoints/2), bases/ (the pretrained base that run used, so this test does not depend on
pretraining again), results.json and metrics.jsonl of the uninterrupted run. Produced with

    python -m experiments.run --config=configs/tiny.py --config.data.cache_dir=CACHE --workdir=RUN \
        --config.method=flexlora --config.model.rank=8 --config.model.ranks=8,6,7 --config.output.figures=False

then RUN cut back (checkpoints/4, results.* removed, metrics.jsonl to 3 lines)."""
import json
import os
import shutil


from conftest import ASSETS
from tiny import assert_json_close

FIXTURE = os.path.join(ASSETS, "resume_ca94b6e")
# the wall clock and the machine (provenance: date, versions, commit, devices), not the run's numbers
WALL_CLOCK = ("speed", "provenance", "seconds", "tokens_per_s", "expert_tokens_per_s_per_user",
              "router_tokens_per_s_per_user", "includes_compile")


# results.json keys that later code adds (the per-user quantiles of issue 31): in a resumed run
# only, the fixture predates them; every key the fixture has must still be there and agree.
ADDED_SINCE = {"test_ppl_distribution", "test_ppl_quantiles"}


def _close(got, want):
    """Equal structure, strings, integers and booleans; floats to 2e-5 relative (the same math; a
    machine of another instruction set may round float32 sums differently, issue 27)."""
    assert_json_close(got, want, 2e-5, 1e-7, skip=WALL_CLOCK, added=ADDED_SINCE)


def test_a_checkpoint_of_the_code_before_resumes_and_ends_as_its_uninterrupted_run(tmp_path, capsys):
    from comigs_jax import experiment
    from configs import tiny
    wd, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(os.path.join(FIXTURE, "run"), wd)
    shutil.copytree(os.path.join(FIXTURE, "bases"), cache / "bases")
    c = tiny.get_config("flexlora")
    c.data.cache_dir = str(cache)
    c.model.rank, c.model.ranks, c.output.figures = 8, "8,6,7", False
    c.federation.shard = False  # the fixture's rows: one device, 3 users (the suite's 8 fake devices would pad to 8)
    results = experiment.run(c, str(wd))
    assert f"[flexlora s0] resumed from round 2 ({wd})" in capsys.readouterr().out
    want = json.load(open(os.path.join(FIXTURE, "results.json")))
    _close(results[("flexlora", 0)], want)
    assert json.load(open(wd / "results.json")) == results[("flexlora", 0)]
    lines = [json.loads(x) for x in open(wd / "metrics.jsonl")]
    kept = [json.loads(x) for x in open(os.path.join(FIXTURE, "run", "metrics.jsonl"))]
    assert lines[:2] == kept[:2]  # rounds 1-2 as the old run wrote them; its round 3 was trained again
    _close(lines, [json.loads(x) for x in open(os.path.join(FIXTURE, "metrics.jsonl"))])
    assert [r["expert_ranks"] for r in lines] == [r["expert_ranks"] for r in kept] + [lines[3]["expert_ranks"]]
