"""The Llama family through the engine: its loss head, vmap = sharded + chunked = loop, and
experiment.run on a GGUF base whose tokenizer the data follows."""
import dataclasses
import json
import os
import re

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from comigs_jax import experiment
from comigs_jax.errors import DataError
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.roles import split_base
from comigs_jax.federated.sharding import single_device_mesh, users_mesh
from comigs_jax.model.config import LlamaConfig, LoRAConfig, MoEConfig
from comigs_jax.model.lm import head_matrix, init_params, language_model
from comigs_jax.train.state import TrainConfig
from comigs_jax.train.steps import lm_loss
from tiny import TOL64, assert_mean_close, markov_users, random_like

VOCAB = 32


def _cfg(tie: bool, n_experts=3, head_block=0, dtype="float32"):
    return LlamaConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=4, n_kv_head=2, dtype=dtype,
                       intermediate_size=24, rope_theta=10000.0, tie_word_embeddings=tie,
                       attn_lora=LoRAConfig(rank=2), head_block=head_block,
                       moe=MoEConfig(n_experts=n_experts, n_generalists=1, top_k=2, lora=LoRAConfig(rank=2)))


def _params(cfg, seed=0):
    """Every leaf random (B factors too, so that the adapters change the logits); the head large
    enough for the loss to depend on it. The initialiser gives only the shapes (jax.eval_shape:
    traced, not compiled; every value is NumPy's)."""
    return random_like(jax.eval_shape(lambda: init_params(cfg, jax.random.key(seed))), 0.3, seed)


@pytest.mark.parametrize("tie", [True, False])
def test_loss_uses_the_familys_head(tie):
    """lm_loss's blocked cross-entropy (a tail block included) equals optax's on the full logits of
    the Llama itself: the tied embedding, or the untied lm_head's kernel transposed."""
    cfg = _cfg(tie, head_block=12)  # 32 = 2 blocks of 12 + a tail of 8
    params = _params(cfg)
    assert ("lm_head" in params) != tie
    base, trainable = split_base(params)
    windows = np.random.default_rng(1).integers(0, VOCAB, (3, 9)).astype(np.int32)
    mask = np.array([True, True, False])
    loss, m = jax.jit(lm_loss, static_argnums=(4, 5))(trainable, base, windows, mask, cfg, 0.0)
    logits, _ = jax.jit(lambda p: language_model(cfg).apply({"params": p}, windows[:, :-1], mask))(params)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
    np.testing.assert_allclose(float(m["ce"]), float(want), rtol=1e-5)
    assert head_matrix(params, cfg).shape == (VOCAB, cfg.n_embd)


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_vmap_sharded_chunked_and_loop_agree(x64):
    """12 Llama users (untied head, GQA) with 1-3 experts: the loop and 8 devices with 2 users
    each processed one at a time (chunk 1) give the same parameters and losses after two rounds
    with a router phase and aggregation. (vmap on one device == loop is test_engine's, for both
    families' shared round code: the family only changes the model inside it.) In float64: TOL64."""
    assert jax.device_count() == 8
    cfg = _cfg(tie=False, dtype="float64")
    base = split_base(_params(cfg))[0]
    train, valid = markov_users(12, 300, 0), markov_users(12, 150, 100)
    counts = [2, 3, 1, 3] * 3
    tc = TrainConfig(rounds=2, local_steps=2, batch_size=4, seq_len=8, router_every=2, router_steps=1)
    out = {}
    for name, mode, layout in (("loop", "loop", Layout(12, single_device_mesh())),
                               ("sharded_chunked", "vmap", Layout(12, users_mesh(), chunk=1))):
        sim = Simulation(cfg, tc, get_method("comigs"), base, train, valid, expert_counts=counts, seed=3,
                         mode=mode, layout=layout)
        losses = []
        for _ in range(2):
            losses.append(np.asarray(sim.run_round()["loss"])[..., :12])
            sim.aggregate()
        out[name] = (_flat(jax.tree.map(lambda x: np.asarray(x)[:12], sim.states.params)), losses, sim)
    assert out["sharded_chunked"][2].layout.model_chunk == 1
    ref_p, ref_l, _ = out["loop"]
    for name in ("sharded_chunked",):
        p, l, _ = out[name]
        for k in ref_p:
            np.testing.assert_allclose(p[k], ref_p[k], **TOL64, err_msg=f"{name} {k}")
        np.testing.assert_allclose(np.stack(l), np.stack(ref_l), **TOL64)


# ----------------------------------------------------------------------------- experiment.run
def _run_cfg(workdir_base, **over):
    from configs import demo
    c = demo.get_config("comigs")  # one method: the run writes into its workdir
    c.base = workdir_base
    c.data.n_users = 2
    c.data.synthetic.vocab_size = 96
    c.data.train_tokens, c.data.valid_tokens, c.data.test_tokens = 2000, 600, 600
    c.train.rounds, c.train.local_steps, c.train.batch_size, c.train.seq_len = 1, 2, 4, 16
    c.train.router_every, c.train.router_steps = 2, 1
    c.eval.n_windows, c.eval.batch_size = 4, 4
    c.output.figures = False
    c.output.progress = False
    c.update_from_flattened_dict(over)
    return c


def test_gguf_base_and_the_data_follow_its_tokenizer(tmp_path):
    """base = a Llama .gguf: converted once into <cache>/bases/ and loaded as an HF Llama
    directory; its tokenizer (from the GGUF's metadata) tokenises the text users, and the run
    trains on those ids; the run's identity keeps data.tokenizer='base'. The same data with
    data.tokenizer='gpt2' is another cache entry whose ids the base cannot embed: one line,
    before any compile."""
    from test_data_text_files import write_corpus
    from test_gguf import write_tiny_gguf
    from transformers import AutoTokenizer

    gguf_path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(gguf_path)
    root = write_corpus(str(tmp_path / "corpus"), n_docs=30)
    cache = str(tmp_path / "cache")
    over = {"data.source": "text_files", "data.text_files.root": root, "data.categories": "de,fr",
            "data.cache_dir": cache, "data.train_tokens": 1500, "data.valid_tokens": 300, "data.test_tokens": 300}
    cfg = _run_cfg(gguf_path, **over)
    cfg.eval.zero_shot = True
    wd = str(tmp_path / "run")
    res = experiment.run(cfg, wd)[("comigs", 0)]
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["identity"]["data.tokenizer"] == "base"
    assert res["provenance"]["versions"]["flax"] and res["provenance"]["device_count"] == jax.device_count()
    comm = res["communication"]  # comigs: attention LoRA + the generalist, every round, both ways
    assert comm["upload_rounds"] == comm["download_rounds"] == [cfg.train.rounds] * 2
    np.testing.assert_array_equal(comm["upload_bytes_float32"], np.multiply(comm["per_round_params"], 4 * cfg.train.rounds))
    converted = os.path.join(cache, "bases", "tiny")
    assert os.path.exists(os.path.join(converted, "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(converted)
    assert all(np.isfinite(u["test_ppl"]) for u in res["users"])
    from comigs_jax.data import load_user_data
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.tokenizer = converted
    data = load_user_data(data_cfg)  # from the run's cache
    assert data.vocab_size == len(tok) and max(int(a.max()) for a in data.train) < len(tok)
    text = tok.decode(data.train[0][:200].tolist())
    assert re.search(r"Q(de|fr)\d+Q", text), text[:200]
    # eval.zero_shot: the base alone on every non-overlapping test window (full protocol)
    from comigs_jax.model.lm import load_checkpoint
    base_cfg, base = load_checkpoint(converted)
    T = cfg.train.seq_len
    forward = jax.jit(lambda x: language_model(base_cfg).apply({"params": base}, x)[0])
    for u, t in zip(res["users"], data.test):
        n = (len(t) - 1) // T
        x = np.stack([t[k * T:k * T + T + 1] for k in range(n)]).astype(np.int32)
        ce = optax.softmax_cross_entropy_with_integer_labels(forward(x[:, :-1]), x[:, 1:]).mean()
        assert u["zero_shot_ppl"] == pytest.approx(float(np.exp(ce)), rel=1e-4), u
        assert u["zero_shot_ppl"] != pytest.approx(u["test_ppl"], rel=1e-4)  # training changed the model
    with pytest.raises(DataError, match=r"outside the model's vocabulary of \d+ ids.*data.tokenizer='gpt2'"):
        experiment.run(_run_cfg(gguf_path, **over, **{"data.tokenizer": "gpt2", "data.allow_fewer_tokens": True}),
                       str(tmp_path / "run_gpt2"))


def test_reference_bins_dtype_follows_the_vocabulary(tmp_path):
    """A tokenizer of more than 65,536 ids (Llama 3's 128,256) reads uint32 files under "auto"
    and refuses uint16 in one line; a smaller one keeps uint16 (test_reproduce)."""
    from tokenizers import Tokenizer, models

    from comigs_jax.data import default_data_config, load_user_data

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = {f"t{i}": i for i in range(70_000)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tok_dir / "tokenizer.json"))
    root = tmp_path / "bins" / "1"
    root.mkdir(parents=True)
    want = {s: np.random.default_rng(i).integers(0, 70_000, 300).astype(np.uint32)
            for i, s in enumerate(("train", "valid", "test"))}
    for s, a in want.items():
        a.tofile(root / f"{s}_0.bin")
    c = default_data_config()
    c.source, c.dir, c.n_users, c.tokenizer = "reference_bins", str(tmp_path / "bins"), 1, str(tok_dir)
    d = load_user_data(c)
    assert d.vocab_size == 70_000 and d.train[0].dtype == np.uint32
    np.testing.assert_array_equal(d.test[0], want["test"])
    c.dtype = "uint16"
    with pytest.raises(ValueError, match=r"^data.dtype='uint16' cannot hold the 70000 ids of data.tokenizer=.*'uint32' or 'auto'$"):
        load_user_data(c)


def test_aggregate_shares_the_common_specialist_slots_of_scanned_leaves():
    """Scanned leaves are [U, L, slots, ...]: with heterogeneous expert counts only the first
    n_shared_specialists slots (axis 2, not the layer axis) are averaged; against NumPy."""
    from comigs_jax.federated.aggregate import aggregate
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 3, 4, 2)).astype(np.float32)  # [U, L, S, d, r]; L != S
    g = rng.standard_normal((3, 2, 1, 4, 2)).astype(np.float32)
    params = {"layers": {"mlp": {"specialists": {"up_A": x}, "generalists": {"up_A": g}}}}
    w = np.array([1.0, 3.0, 0.0], np.float32)
    out = aggregate(params, w, ("generalist", "specialist"), n_shared_specialists=2)
    spec = np.asarray(out["layers"]["mlp"]["specialists"]["up_A"])
    assert_mean_close(spec[:, :, :2], x[:, :, :2], w, err_msg="shared specialist slots")
    np.testing.assert_array_equal(spec[:, :, 2:], x[:, :, 2:])  # the slot not every user has
    assert_mean_close(out["layers"]["mlp"]["generalists"]["up_A"], g, w, err_msg="generalist")


def test_token_gate_weights_are_stacked_in_layer_order():
    """[L, B, T, E] per-token expert weights of the scanned blocks: rows sum to 1 over the user's
    experts (0 on absent ones), and layer 0's equal a 1-layer model's on layer 0's parameters."""
    from comigs_jax.model.lm import token_gate_weights
    cfg = dataclasses.replace(_cfg(tie=True), n_layer=3)
    params = _params(cfg)
    tokens = np.arange(20, dtype=np.int32).reshape(2, 10) % VOCAB
    mask = np.array([True, True, False])
    w = np.asarray(jax.jit(token_gate_weights, static_argnums=0)(cfg, params, tokens, mask))
    assert w.shape == (3, 2, 10, 3)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert (w[..., 2] == 0).all()
    one = dataclasses.replace(cfg, n_layer=1)
    first = jax.tree.map(lambda x: x, params)
    first["layers"] = jax.tree.map(lambda x: x[:1], params["layers"])
    w1 = np.asarray(jax.jit(token_gate_weights, static_argnums=0)(one, first, tokens, mask))
    np.testing.assert_allclose(w1[0], w[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(w[0], w[1])  # the layers differ
