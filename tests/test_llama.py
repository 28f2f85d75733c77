"""Llama against Hugging Face's PyTorch LlamaForCausalLM (golden logits made by
tests/assets/make_llama_golden.py), its mixture of LoRA experts, roles, configs and loading errors."""
import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.federated.roles import ROLES, label_params, merge, split_base
from comigs_jax.model import moe as moe_lib
from comigs_jax.model.config import GPT2Config, LlamaConfig, LoRAConfig, MoEConfig, RopeScaling
from comigs_jax.model.hf import CheckpointError, read_safetensors
from comigs_jax.model.hf_llama import load_llama
from comigs_jax.model.llama import Llama, LlamaMoEMLP, init_llama_params, llama_param_shapes
from conftest import ASSETS, write_safetensors
from tiny import TOL64

VARIANTS = ("llama_tiny", "llama_tiny_untied")


@functools.partial(jax.jit, static_argnums=(0, 4))
def forward(cfg, params, tokens, mask=None, return_hidden=False):
    """Llama(cfg).apply(...), jitted: one compile per config instead of an op-by-op trace."""
    return Llama(cfg).apply({"params": params}, tokens, mask, return_hidden=return_hidden)


@pytest.fixture(scope="module")
def golden():
    return np.load(os.path.join(ASSETS, "llama_tiny_golden.npz"))


@pytest.fixture(scope="module")
def tied():
    return load_llama(os.path.join(ASSETS, "llama_tiny"))


def _moe_cfg(base_cfg, moe_cfg, **kw):
    return dataclasses.replace(base_cfg, attn_lora=LoRAConfig(rank=4), moe=moe_cfg, **kw)


def _random(shapes, seed, zero_b=False):
    """numpy values for a tree of shapes: N(0, 0.3^2), B factors 0 if zero_b. Cheaper than a
    compiled init for every config (the tests' time is compile time)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros(x.shape, np.float32) if zero_b and str(p[-1].key).endswith("B")
        else (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)


def _with_base(cfg, base, seed, zero_b=False):
    """base merged with random adapters of cfg."""
    return merge(base, _random(split_base(llama_param_shapes(cfg))[1], seed, zero_b))


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_hugging_face(golden, name):
    cfg, params = load_llama(os.path.join(ASSETS, name))
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (2, 32, 4, 2, 128)
    assert cfg.tie_word_embeddings == (name == "llama_tiny") and ("lm_head" in params) != cfg.tie_word_embeddings
    logits, aux = forward(cfg, params, jnp.asarray(golden["input_ids"]))
    ref = golden[f"logits_{name}"]
    assert aux == {} and logits.dtype == jnp.float32 and logits.shape == ref.shape
    err = np.abs(np.asarray(logits) - ref).max()
    assert err <= 1e-4, f"max |logit difference| {err}"
    assert np.abs(ref).max() > 0.5  # not vacuous: the logits vary far more than the tolerance
    if cfg.rope_scaling is not None:  # the llama3 frequency adjustment is what makes them match
        plain, _ = forward(dataclasses.replace(cfg, rope_scaling=None), params, jnp.asarray(golden["input_ids"]))
        assert np.abs(np.asarray(plain) - ref).max() > 1e-3


def test_bfloat16_activations_keep_float32_params(golden):
    cfg, params = load_llama(os.path.join(ASSETS, "llama_tiny"), dtype="bfloat16")
    logits, _ = forward(cfg, params, jnp.asarray(golden["input_ids"]))
    assert logits.dtype == jnp.float32
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    assert np.abs(np.asarray(logits) - golden["logits_llama_tiny"]).max() < 0.1  # close, not exact
    hidden, _ = forward(cfg, params, jnp.asarray(golden["input_ids"]), None, True)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (2, 16, 32)


def test_return_hidden_is_the_tied_head_input(golden, tied):
    cfg, params = tied
    tokens = jnp.asarray(golden["input_ids"])
    hidden, _ = forward(cfg, params, tokens, None, True)
    logits, _ = forward(cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(hidden @ params["embed_tokens"]["embedding"].T),
                               np.asarray(logits), atol=1e-5)


# ---------------------------------------------------------------- architecture
def test_causal(tied):
    cfg, params = tied
    a = jnp.arange(12).reshape(1, 12) % cfg.vocab_size
    b = a.at[0, 8:].set(7)
    la, _ = forward(cfg, params, a)
    lb, _ = forward(cfg, params, b)
    np.testing.assert_allclose(la[0, :8], lb[0, :8], atol=1e-6)
    assert np.abs(np.asarray(la[0, 8:] - lb[0, 8:])).max() > 1e-4


def test_gqa_shapes_and_grouping(tied, x64):
    """k/v project to n_kv_head heads; query head n reads kv head n // (n_head / n_kv_head): the
    model equals the multi-head one whose k/v kernels repeat each kv head for its group (two
    programs: in float64, tests/tiny.py TOL64)."""
    cfg, params = tied
    cfg = dataclasses.replace(cfg, dtype="float64")
    hd, group = cfg.dim_head, cfg.n_head // cfg.n_kv_head
    attn = params["layers"]["self_attn"]  # scanned: every leaf [L, ...]
    L = cfg.n_layer
    assert attn["q_proj"]["kernel"].shape == (L, 32, cfg.n_head * hd)
    assert attn["k_proj"]["kernel"].shape == attn["v_proj"]["kernel"].shape == (L, 32, cfg.n_kv_head * hd)
    assert attn["o_proj"]["kernel"].shape == (L, cfg.n_head * hd, 32)

    def repeat(kernel):  # [L, d, KV*hd] -> [L, d, H*hd], each kv head repeated `group` times in place
        return np.repeat(kernel.reshape(L, -1, cfg.n_kv_head, 1, hd), group, 3).reshape(L, -1, cfg.n_head * hd)

    mha = jax.tree.map(lambda x: x, params)
    for name in ("k_proj", "v_proj"):
        mha["layers"]["self_attn"][name] = {"kernel": repeat(params["layers"]["self_attn"][name]["kernel"])}
    tokens = jnp.arange(24).reshape(2, 12) % cfg.vocab_size
    l_gqa, _ = forward(cfg, params, tokens)
    l_mha, _ = forward(dataclasses.replace(cfg, n_kv_head=cfg.n_head), mha, tokens)
    np.testing.assert_allclose(np.asarray(l_gqa), np.asarray(l_mha), **TOL64)


def test_named_sizes_parameter_counts():
    from comigs_jax.model.config import LLAMA_SIZES
    count = lambda name: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(llama_param_shapes(LlamaConfig(**LLAMA_SIZES[name]))))
    assert count("smollm2-135m") == 134_515_008  # HF's SmolLM2-135M, tied
    assert count("llama-3.2-1b") == 1_235_814_400  # HF's Llama-3.2-1B, tied


# ---------------------------------------------------------------- mixture of experts
def _naive_moe(params, h, w, s):
    """sum_e w_e expert_e(h), each expert the whole SwiGLU MLP with its own LoRA (the direct form)."""
    stack = lambda leaf: jnp.concatenate([params[g][leaf] for g in ("generalists", "specialists") if g in params])
    ga, gb, ua, ub, da, db = (stack(n) for n in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B"))
    wg, wu, wd = (params[n]["kernel"] for n in ("gate_proj", "up_proj", "down_proj"))
    out = 0
    for e in range(w.shape[-1]):
        a = jax.nn.silu(h @ wg + s * (h @ ga[e]) @ gb[e]) * (h @ wu + s * (h @ ua[e]) @ ub[e])
        out = out + w[..., e:e + 1] * (a @ wd + s * (a @ da[e]) @ db[e])
    return out


@pytest.mark.parametrize("remat", ["none", "moe"])
def test_moe_mlp_equals_naive_form_values_and_gradients(remat):
    cfg = MoEConfig(n_experts=3, n_generalists=1, top_k=2, lora=LoRAConfig(rank=4))
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mod = LlamaMoEMLP(cfg, 16, 24, remat=remat)
    params = _random(jax.eval_shape(mod.init, jax.random.key(0), h, jnp.ones((2, 5, 3)))["params"], 0)
    frozen = {k: params[k] for k in ("gate_proj", "up_proj", "down_proj")}
    lora = {k: v for k, v in params.items() if k not in frozen}
    w = moe_lib.gate(jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32), jnp.ones(3, bool), 2)
    probe = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)  # a loss that weighs every output
    loss = lambda t, h, w: (mod.apply({"params": {**frozen, **t}}, h, w) * probe).sum()
    ref_loss = lambda t, h, w: (_naive_moe({**frozen, **t}, h, w, cfg.lora.scale) * probe).sum()
    got_v, got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(lora, h, w)
    ref_v, ref = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2)))(lora, h, w)
    np.testing.assert_allclose(float(got_v), float(ref_v), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 0, jax.tree_util.keystr(path)
        assert np.abs(b - a).max() <= 1e-5 * np.abs(a).max(), jax.tree_util.keystr(path)


def test_gradients_reach_only_selected_experts():
    cfg = MoEConfig(n_experts=4, n_generalists=1, top_k=2, lora=LoRAConfig(rank=4))
    h = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 16)), jnp.float32)
    mod = LlamaMoEMLP(cfg, 16, 24)
    params = _random(jax.eval_shape(mod.init, jax.random.key(0), h, jnp.ones((1, 1, 4)))["params"], 0)
    w = moe_lib.gate(jnp.asarray([[[0.1, 2.0, -1.0, 1.5]]]), jnp.ones(4, bool), 2)  # slots 1 and 3
    grads = jax.jit(jax.grad(lambda p: mod.apply({"params": p}, h, w).sum()))(params)
    for leaf in ("gate_B", "up_B", "down_B"):
        gen = np.asarray(grads["generalists"][leaf])   # slot 0
        spec = np.asarray(grads["specialists"][leaf])  # slots 1, 2, 3
        assert np.all(gen == 0) and np.all(spec[1] == 0), leaf
        assert np.abs(spec[0]).max() > 0 and np.abs(spec[2]).max() > 0, leaf


@pytest.mark.parametrize("moe_cfg,mask", [
    (MoEConfig(n_experts=4, top_k=2), [1, 0, 1, 1]),
    (MoEConfig(n_experts=4, top_k=2), [1, 0, 0, 0]),
    (MoEConfig(n_experts=4, router="uniform"), [1, 1, 0, 1]),
])
def test_zero_b_gives_plain_llama_logits(golden, tied, moe_cfg, mask):
    base_cfg, base = tied
    tokens = jnp.asarray(golden["input_ids"])
    cfg = _moe_cfg(base_cfg, moe_cfg)
    params = _with_base(cfg, base, 1, zero_b=True)  # random routers and A's, every B 0 (attention too)
    logits, aux = forward(cfg, params, tokens, jnp.asarray(mask, bool))
    np.testing.assert_allclose(np.asarray(logits), golden["logits_llama_tiny"], atol=2e-5)
    assert aux["lb"].shape == (2,) and aux["router_prob"].shape == aux["selection"].shape == (2, 4)
    np.testing.assert_allclose(np.asarray(aux["selection"]).sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(aux["selection"])[:, np.asarray(mask) == 0] == 0)


def test_remat_and_dropout(x64):
    """remat "block" gives the same loss and gradients; LoRA dropout acts only when not
    deterministic. Also the compiled init runs and gives HF's init layout (B factors 0)."""
    cfg = LlamaConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, n_kv_head=2, dtype="float64",
                      intermediate_size=48, attn_lora=LoRAConfig(rank=4),
                      moe=MoEConfig(n_experts=3, top_k=2, lora=LoRAConfig(rank=4, dropout=0.5)))
    init = init_llama_params(cfg, jax.random.key(0))
    assert all(np.all(np.asarray(v) == 0) == str(p[-1].key).endswith("B")
               for p, v in jax.tree_util.tree_leaves_with_path(init))
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), merge(split_base(init)[0], _random(split_base(init)[1], 2)))
    tokens = jnp.arange(24).reshape(2, 12) % 64

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def loss_grad(cfg, params, deterministic):
        def loss(p):
            logits, aux = Llama(cfg).apply({"params": p}, tokens, None, deterministic,
                                            rngs={"dropout": jax.random.key(0)})
            return logits.std() + aux["lb"].sum()
        return jax.value_and_grad(loss)(params)

    v, g = loss_grad(cfg, params, True)
    v_b, g_b = loss_grad(dataclasses.replace(cfg, remat="block"), params, True)
    # two programs (recomputation reorders sums: 4.6e-6 relative in float32 on one machine): float64
    np.testing.assert_allclose(float(v_b), float(v), **TOL64)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL64)
    v_d, _ = loss_grad(cfg, params, False)
    assert abs(float(v_d) - float(v)) > 1e-6


# ---------------------------------------------------------------- roles
@pytest.mark.parametrize("moe_cfg,tie", [(MoEConfig(), True), (MoEConfig(n_experts=4, n_generalists=2), False),
                                         (MoEConfig(n_experts=3, n_generalists=0), True),
                                         (MoEConfig(router="uniform"), False)])
def test_roles_of_every_leaf(moe_cfg, tie):
    cfg = LlamaConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                      intermediate_size=48, tie_word_embeddings=tie, attn_lora=LoRAConfig(rank=2), moe=moe_cfg)
    shapes = llama_param_shapes(cfg)
    flat = traverse_util.flatten_dict(shapes)
    labels = traverse_util.flatten_dict(label_params(shapes))
    assert labels.keys() == flat.keys() and set(labels.values()) <= set(ROLES)
    base, trainable = split_base(shapes)
    # The base is exactly the plain Llama a checkpoint holds.
    assert traverse_util.flatten_dict(base).keys() == traverse_util.flatten_dict(llama_param_shapes(cfg.base)).keys()
    for path, role in labels.items():
        name = "/".join(path)
        if path[-1] in ("lora_A", "lora_B"):
            assert role == "attn" and path[2] in ("q_proj", "k_proj", "v_proj", "o_proj"), name
        elif "generalists" in path or "specialists" in path:
            assert role == path[2][:-1] and flat[path].shape[:2] == (2,  # [L, experts of the role, ...]
                moe_cfg.n_generalists if role == "generalist" else moe_cfg.n_specialists), name
            assert path[0] == "layers", name
        elif path[1] == "router":
            assert role == "router" and flat[path].shape == (2, 32, moe_cfg.n_experts), name
        else:
            assert role == "base", name
    expect = {"attn"} | ({"router"} if moe_cfg.router == "learned" else set())
    expect |= {"generalist"} if moe_cfg.n_generalists else set()
    expect |= {"specialist"} if moe_cfg.n_specialists else set()
    assert {labels[p] for p in traverse_util.flatten_dict(trainable)} == expect
    assert not any(p[-1] == "bias" for p in flat)  # Llama has no biases
    assert ("lm_head", "kernel") in flat if not tie else ("lm_head", "kernel") not in flat


# ---------------------------------------------------------------- configs and loading
def test_family_dispatch():
    assert GPT2Config().family == "gpt2" and LlamaConfig().family == "llama"
    assert "family" not in {f.name for f in dataclasses.fields(LlamaConfig)}
    cfg = LlamaConfig(attn_lora=LoRAConfig(), moe=MoEConfig())
    assert cfg.base == LlamaConfig() and cfg.dim_head == 64


@pytest.mark.parametrize("kw,match", [
    (dict(n_kv_head=2), "n_head=9 is not a multiple of n_kv_head=2"),
    (dict(n_embd=100, n_head=8, n_kv_head=8), "not divisible by n_head"),
    (dict(head_dim=7), "even head dimension"),
    (dict(rope_theta=0.0), "must be positive"),
    (dict(intermediate_size=0), "intermediate_size=0"),
    (dict(remat="all"), "remat='all'"),
    (dict(dtype="float16"), "dtype='float16'"),
    (dict(head_block=-1), "head_block=-1"),
    (dict(rope_scaling={"factor": 8}), "rope_scaling="),
])
def test_config_validation_one_liners(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        LlamaConfig(**kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        RopeScaling(rope_type="yarn")


def _copy_asset(tmp_path, edit_config=None, edit_tensors=None):
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(ASSETS, "llama_tiny"), d)
    if edit_config:
        hf = json.loads((d / "config.json").read_text())
        edit_config(hf)
        (d / "config.json").write_text(json.dumps(hf))
    if edit_tensors:
        t = load_file(str(d / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(d / "model.safetensors"))
    return str(d)


@pytest.mark.parametrize("edit_config,edit_tensors,match", [
    (lambda c: c.update(model_type="mistral"), None, "config.json: model_type='mistral': only 'llama'"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), None, "rope_type='yarn'"),
    (lambda c: c.update(attention_bias=True), None, "attention_bias=true"),
    (None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"model.safetensors: missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    (None, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}),
     r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape \(32, 32\), the config needs \(16, 32\)"),
    (None, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros((32,), np.float32)}),
     "q_proj.bias has no place"),
])
def test_load_errors_are_one_line(tmp_path, edit_config, edit_tensors, match):
    d = _copy_asset(tmp_path, edit_config, edit_tensors)
    with pytest.raises(CheckpointError, match=match) as e:
        load_llama(d)
    assert "\n" not in str(e.value)


def test_legacy_rope_config_layout(tmp_path):
    """Older config.json files (e.g. Llama 3.2's on the hub) hold rope_theta and rope_scaling at the
    top level instead of transformers 5's rope_parameters."""
    def legacy(c):
        c.pop("rope_parameters")
        c.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg, _ = load_llama(_copy_asset(tmp_path, legacy))
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_bfloat16_checkpoint_loads(tmp_path, golden):
    """HF's Llama checkpoints are bfloat16 safetensors: they load (as float32), and the reader agrees
    with safetensors' own on float32 files."""
    import ml_dtypes
    from safetensors.numpy import load_file
    src = os.path.join(ASSETS, "llama_tiny", "model.safetensors")
    ref = load_file(src)
    got = read_safetensors(src)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    d = _copy_asset(tmp_path)
    write_safetensors(os.path.join(d, "model.safetensors"), ref, "BF16", ml_dtypes.bfloat16)
    cfg, params = load_llama(d)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    logits, _ = forward(cfg, params, jnp.asarray(golden["input_ids"]))
    err = np.abs(np.asarray(logits) - golden["logits_llama_tiny"]).max()
    assert 0 < err < 0.1  # the weights rounded to bfloat16: close, not exact
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:  # cut short
        f.truncate(os.path.getsize(os.path.join(d, "model.safetensors")) - 100)
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read .* damaged or incomplete") as e:
        load_llama(d)
    assert "\n" not in str(e.value)
