"""Reproducing the reference (docs/reproducing.md): its data layout (reference_bins), pre-split
text folders, the `full` evaluation protocol, and configs/reference.py against its doc table."""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from comigs_jax.data import default_data_config, load_user_data, tokens
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.roles import merge
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.model.gpt2 import GPT2
from comigs_jax.train import evaluation
from comigs_jax.train.state import TrainConfig
import entrypoint
from tiny import TOL64, VOCAB, markov_users, tiny_base, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GPT2 = os.path.join(REPO, "tests", "assets", "gpt2_tiny")  # vocabulary 512, 64 positions


# ----------------------------------------------------------------------------- the full protocol
def _numpy_full_ppl(apply, params_u, mask_u, stream, T):
    """exp(token-mean CE) over x_k = t[Tk : Tk+T], y_k = t[Tk+1 : Tk+T+1], one window at a time,
    the cross-entropy in float64 NumPy."""
    nll = []
    for k in range((len(stream) - 1) // T):
        x = np.asarray(stream[T * k: T * k + T], np.int32)[None]
        y = np.asarray(stream[T * k + 1: T * k + T + 1], np.int64)
        logits = np.asarray(apply(params_u, x, mask_u)[0], np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll.extend(-logp[np.arange(T), y])
    return float(np.exp(np.mean(nll))), len(nll)


def test_full_protocol_scores_exactly_the_non_overlapping_windows(x64):
    """In float64: the evaluation at two batch sizes and the jitted apply are different programs."""
    T = 8
    cfg = tiny_cfg(n_experts=3, dtype="float64")
    base = tiny_base(cfg)
    train = markov_users(3, 300, 0)
    tc = TrainConfig(rounds=1, local_steps=3, batch_size=4, seq_len=T, router_every=2, router_steps=1)
    sim = Simulation(cfg, tc, get_method("comigs"), base, train, markov_users(3, 200, 1), expert_counts=[3, 2, 1])
    leaves, tree = jax.tree.flatten(sim.states.params)  # nonzero LoRA B, different for every user
    rng = np.random.default_rng(0)
    noisy = [np.asarray(x) + 0.3 * rng.standard_normal(x.shape) for x in leaves]
    sim.states = sim.states.replace(params=jax.tree.unflatten(tree, noisy))
    # hand-made test streams: lengths with (n - 1) % T = 0, 5, 1; 9, 4 and 3 windows
    tests = [np.arange(73) % VOCAB, (np.arange(38) * 7 + 3) % VOCAB, (np.arange(26) * 5) % VOCAB]
    tests = [t.astype(np.uint16) for t in tests]
    starts, w = evaluation.eval_windows("full", [len(t) for t in tests], T, 0, 4)
    assert starts.shape == (3, 12) and w.sum(1).tolist() == [9, 4, 3]
    assert starts[0, :9].tolist() == list(range(0, 72, 8)) and starts[2, :3].tolist() == [0, 8, 16]
    got = sim.evaluate(tests, 1, 4, protocol="full", seed=0)
    again = sim.evaluate(tests, 999, 4, protocol="full", seed=123)  # n_windows and seed play no part
    other_batch = sim.evaluate(tests, 1, 2, protocol="full")
    np.testing.assert_array_equal(got["ce"], again["ce"])
    np.testing.assert_allclose(got["ce"], other_batch["ce"], **TOL64)
    apply = jax.jit(lambda p, x, m: GPT2(sim.model_cfg).apply({"params": merge(base, p)}, x, m, deterministic=True)[0])
    for u, t in enumerate(tests):
        p_u = sim.user_params(u)
        ppl, n = _numpy_full_ppl(apply, p_u, sim.masks[u], t, T)
        assert got["n_tokens"][u] == n
        assert np.exp(got["ce"][u]) == pytest.approx(ppl, rel=TOL64["rtol"])


# ----------------------------------------------------------------------------- reference_bins
def _write_bins(root, n_users=4, seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, str(n_users)), exist_ok=True)
    arrays = {}
    for i in range(n_users):
        for s, n in (("train", 2000 + 37 * i), ("valid", 700 + i), ("test", 500 + 11 * i)):
            a = rng.integers(0, 512, n).astype(dtype)
            a.tofile(os.path.join(root, str(n_users), f"{s}_{i}.bin"))
            arrays[s, i] = a
    return arrays


def _bins_cfg(root, **kw):
    c = default_data_config()
    c.source, c.dir = "reference_bins", root
    for k, v in kw.items():
        c[k] = v
    return c


def test_reference_bins_are_read_as_given_and_bad_files_are_named(tmp_path):
    root = str(tmp_path / "data")
    want = _write_bins(root)
    d = load_user_data(_bins_cfg(root))
    assert d.users == [f"user{i}" for i in range(4)] and d.vocab_size == 50257 and d.eos_id == 50256
    for (s, i), a in want.items():
        assert d.split(s)[i].dtype == np.uint16
        np.testing.assert_array_equal(d.split(s)[i], a)
    sub = load_user_data(_bins_cfg(root), user_indices=[3, 1])  # one host's users only
    np.testing.assert_array_equal(sub.test[0], want["test", 3])
    # uint32 files
    want32 = _write_bins(str(tmp_path / "d32"), dtype=np.uint32)
    np.testing.assert_array_equal(load_user_data(_bins_cfg(str(tmp_path / "d32"), dtype="uint32")).valid[2],
                                  want32["valid", 2])
    path = os.path.join(root, "4", "valid_1.bin")
    for damage, message in [
        (lambda: open(path, "ab").write(b"\x01"), "is not a whole number of 2-byte uint16 tokens"),
        (lambda: np.array([3, 60000] * 200, np.uint16).tofile(path), "is outside the vocabulary"),
        (lambda: np.arange(100, dtype=np.uint16).tofile(path), "fewer than one window"),
        (lambda: os.remove(path), "missing"),
    ]:
        damage()
        with pytest.raises(ValueError, match=message) as e:
            load_user_data(_bins_cfg(root))
        assert str(e.value).startswith(path)
        want["valid", 1].tofile(path)
    with pytest.raises(ValueError, match=r"data.n_users=3 .*found: 4"):
        load_user_data(_bins_cfg(root, n_users=3))
    with pytest.raises(ValueError, match="data.dir"):
        load_user_data(_bins_cfg(""))


def _run(args, cache):
    """experiments.run's main(argv) in this process (one device, as a subprocess): tests/entrypoint.py."""
    return entrypoint.main(args, cache)


SHORT = ["--config.train.rounds=2", "--config.train.local_steps=3", "--config.train.batch_size=4",
         "--config.train.seq_len=32", "--config.train.router_every=3", "--config.train.router_steps=1",
         "--config.eval.every_rounds=1", "--config.eval.batch_size=8", "--config.output.figures=False",
         "--config.output.progress=False"]


def test_reference_config_runs_on_reference_bins_through_the_entry_point(tmp_path):
    root = str(tmp_path / "data")
    want = _write_bins(root)
    wd = str(tmp_path / "run")
    p = _run(["--config=configs/reference.py:comigs_1g1s", f"--config.base={TINY_GPT2}", f"--config.data.dir={root}",
              "--config.seed=45", f"--workdir={wd}", *SHORT], str(tmp_path / "cache"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(os.path.join(wd, "results.json")))
    assert (res["method"], res["seed"], res["faithful"]) == ("comigs", 45, True)
    d = res["data"]
    assert d["source"] == "reference_bins" and d["file_dtype"] == "uint16"
    for i in range(4):
        for s in ("train", "valid", "test"):  # the run read exactly the written tokens
            assert d["files"][s][i] == os.path.join(root, "4", f"{s}_{i}.bin")
            assert d["tokens"][i][s] == len(want[s, i])
            assert d["sha256"][i][s] == hashlib.sha256(want[s, i].tobytes()).hexdigest()
    # full protocol: floor((n - 1) / 32) windows of 32 targets per user
    assert res["eval"]["protocol"] == "full"
    assert res["eval"]["scored_tokens"] == [(len(want["test", i]) - 1) // 32 * 32 for i in range(4)]
    records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["includes_compile"] and "includes_compile" not in records[1]
    for r in records:  # 3 expert steps x 4 x 32 tokens, one router phase of 1 step, per user
        assert r["expert_tokens_per_s_per_user"] == pytest.approx([3 * 4 * 32 / r["seconds"]] * 4)
        assert r["router_tokens_per_s_per_user"] == pytest.approx([1 * 4 * 32 / r["seconds"]] * 4)
    assert res["speed"]["expert_tokens_per_s_per_user"] == pytest.approx(records[1]["expert_tokens_per_s_per_user"])
    # an id inside GPT-2's vocabulary but outside the base's 512: one line naming the file
    np.full(600, 600, np.uint16).tofile(os.path.join(root, "4", "test_2.bin"))
    p = _run(["--config=configs/reference.py:comigs_1g1s", f"--config.base={TINY_GPT2}", f"--config.data.dir={root}",
              f"--workdir={tmp_path / 'run2'}", *SHORT], str(tmp_path / "cache"))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {os.path.join(root, '4', 'test_2.bin')}: token id 600")


# ----------------------------------------------------------------------------- configs/reference.py
def test_reference_configs_match_their_scripts_and_the_docs_table():
    from comigs_jax import configuration
    from configs import reference

    doc = open(reference.DOC).read()
    assert reference.doc_block() in doc, "docs/reproducing.md is stale: run `python -m configs.reference`"
    table = doc[doc.index(reference.BEGIN):doc.index(reference.END)]
    roles = {"expert_0": {"attn", "generalist"}, "experts": {"attn", "generalist", "specialist"},
             "all": {"attn", "generalist", "specialist"},  # `all` also averages routers (docs: a difference)
             "ffalora": {"attn", "generalist", "specialist"}, "fedsalora": {"attn", "generalist", "specialist"}}
    for arg, s in reference.SCRIPTS.items():
        c = reference.get_config(arg)
        c.data.dir = "/nonexistent"
        code = s.commit + (", Llama" if s.base != "gpt2" else "")
        assert f"`{os.path.basename(s.script)}` ({s.table}) | {code} | `:{arg}` | `{s.method}` |" in table
        m = get_method(c.method)
        assert c.method == s.method and m.router_mode == s.router
        assert set(m.shared_roles) == (set() if m.pcl is not None else roles[s.strategy])  # PCL: no server
        assert m.one_round == (s.rounds == 1) and m.pooled_data == (s.clients == 1)
        assert c.train.rounds * c.train.local_steps == s.rounds * s.local_steps == 200
        if s.rounds > 1:
            assert (c.train.rounds, c.train.local_steps) == (s.rounds, s.local_steps)
        assert c.train.batch_size * (c.data.n_users if m.pooled_data else 1) == s.batch
        assert c.eval.every_rounds * c.train.local_steps == 20
        own = {"train.lb_weight": s.lb_weight, "model.n_experts": s.experts, "model.rank": s.rank,
               "train.lr": s.lr, "train.router_lr": s.router_lr}
        if s.experts == 1:  # Tables 2 / 4's one-expert LoRA baselines: no generalist slot, k = 1
            own.update({"model.n_generalists": 0, "model.top_k": 1})
        for key, value in reference.COMMON.items():
            group, name = key.split(".")
            assert c[group][name] == own.get(key, value), (arg, key)
        assert (c.model.ranks, c.train.prune_lambda) == (s.ranks, s.prune_lambda)
        ranks = configuration.ranks_of(c)
        assert ranks is None or (len(ranks) == 4 and max(ranks) == c.model.rank), arg
        assert (c.data.source, c.base, c.seed, c.train.faithful) == ("reference_bins", s.base, 42, True)
        assert c.model.router_kind == ("noisy_topk" if s.base != "gpt2" else "learned")
        assert (c.eval.n_windows, c.eval.batch_size) == (6400, 64)
        assert configuration.train_config(c).total_steps == 200
    assert reference.get_config("pcl").train.lb_weight == 0.0  # baseline_PCL.sh: -lb_lam 0.0
    # FFA-LoRA: 77efb25's script is FedAvg of A and B (faithful), 2d42464's freezes the experts' A (D4)
    ffa_77 = get_method(reference.get_config("ffalora_1616").method).for_mode(True)
    ffa_2d = get_method(reference.get_config("ffalora_1616_2d42464").method).for_mode(True)
    assert (ffa_77.frozen, ffa_77.shared_factors) == ((), ("A", "B"))
    assert ffa_2d.frozen == ("generalist.A", "specialist.A") and reference.get_config("ffalora_1616").train.prune_lambda == 0.01
    assert get_method("fedsa_lora").for_mode(True).shared_factors == ("A", "B")  # D5
    # the Llama scripts: D6's lr as run (2e-3) and as intended (2e-4); pFedMoE_llama.sh ran 2e-4
    assert [reference.get_config(a).train.lr for a in ("comigs_1g1s_llama", "comigs_1g1s_llama_intended",
                                                        "pfedmoe_llama")] == [2e-3, 2e-4, 2e-4]
    assert "baseline_PCL.sh" not in reference.NOT_AVAILABLE
    with pytest.raises(ValueError, match="allowed"):
        reference.get_config("no_such_script")


# ----------------------------------------------------------------------------- pre-split text folders
def test_pre_split_text_folders_are_used_as_given(tmp_path):
    root = tmp_path / "corpus"
    docs = {}
    for u, lang in enumerate(["alpha", "beta", "gamma"]):
        d = root / lang
        d.mkdir(parents=True)
        train = [f"{lang} train document {k}: " + " ".join(["word"] * (5 + k)) for k in range(6)]
        valid = [f"{lang} valid document {k} " + "x" * k for k in range(3)]
        test = [f"{lang} test line {k}" for k in range(4)]
        (d / "train.txt").write_text("\n\n".join(train))  # paragraphs (a final newline would belong to the last one)
        (d / ("validation.jsonl" if u == 1 else "valid.jsonl")).write_text(
            "".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(valid)))
        (d / "test.txt").write_text("\n\n".join(test))
        docs[lang] = {"train": train, "valid": valid, "test": test}
    c = default_data_config()
    c.source, c.text_files.root, c.n_users, c.cache_dir = "text_files", str(root), 3, str(tmp_path / "cache")
    c.min_tokens, c.progress = 2, False
    tok = tokens.get_tokenizer("gpt2")
    for attempt in ("built", "cached"):
        d = load_user_data(c)
        assert d.users == ["alpha", "beta", "gamma"] and d.info["partition"] == "given"
        assert bool(d.info["cache_hits"]) == (attempt == "cached")
        for i, lang in enumerate(d.users):
            for s in ("train", "valid", "test"):  # file order, each document + end-of-text, nothing cut
                want = [t for doc in docs[lang][s] for t in tok.encode(doc) + [50256]]
                np.testing.assert_array_equal(d.split(s)[i], want, err_msg=f"{lang} {s}")
    (root / "beta" / "test.txt").rename(root / "beta" / "notes.txt")
    with pytest.raises(ValueError, match="beta.*pre-split, but no test"):
        load_user_data(c)
