"""KV-cache decoding (comigs_jax.model.decode): a prefill and one-token steps give the logits and
routing of a full forward of the sequence, for both families with the mixture of experts on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TOL64, random_like, tiny_cfg

from comigs_jax.model import decode
from comigs_jax.model.config import LlamaConfig, LoRAConfig, MoEConfig
from comigs_jax.model.lm import init_params, language_model, token_gate_weights


def configs(dtype="float32"):
    moe = MoEConfig(n_experts=3, n_generalists=1, top_k=2, lora=LoRAConfig(rank=2))
    llama = LlamaConfig(vocab_size=32, n_positions=32, n_embd=16, n_layer=2, n_head=4, n_kv_head=2,
                        intermediate_size=24, attn_lora=LoRAConfig(rank=2), moe=moe, dtype=dtype)
    return {"gpt2": tiny_cfg(n_experts=3, top_k=2, n_layer=2, dtype=dtype), "llama": llama}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, x64_module):
    """In float64: the cached steps and the full forward are different programs (tiny.py TOL64)."""
    family = request.param
    cfg = configs("float64")[family]
    # every leaf random (LoRA B and routers too): the adapters and the routing matter
    params = jax.tree.map(lambda x: x.astype(np.float64),
                          random_like(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), 0.3, seed=1))
    mask = jnp.asarray([True, True, family == "gpt2"])  # the Llama user lacks expert 2
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 12)), jnp.int32)
    # a full forward: logits [B, T, V] and gates [L, B, T, E], one jitted program
    full = jax.jit(lambda p, t: (language_model(cfg).apply({"params": p}, t, mask)[0],
                                 token_gate_weights(cfg, p, t, mask)))
    return cfg, params, mask, tokens, full


def test_prefill_and_steps_equal_a_full_forward(model):
    cfg, params, mask, tokens, full = model
    logits_full, gates = full(params, tokens)
    step = jax.jit(lambda p, t, c, i: decode.forward_cached(cfg, p, t, c, i, mask))
    p0 = 5
    cache = decode.init_cache(cfg, 2, tokens.shape[1])
    logits, cache, g = step(params, tokens[:, :p0], cache, 0)
    out, gs = [logits], [g]
    for i in range(p0, tokens.shape[1]):
        logits, cache, g = step(params, tokens[:, i:i + 1], cache, i)
        out.append(logits)
        gs.append(g)
    np.testing.assert_allclose(np.concatenate(out, 1), logits_full, **TOL64)
    np.testing.assert_allclose(np.concatenate(gs, 2), gates, **TOL64)
    assert np.abs(np.asarray(logits_full)).max() > 0.1  # not a trivially zero model
    assert 0.05 < float(np.asarray(gates)[..., 0].mean()) < 0.95  # the routing is not degenerate


def test_greedy_generation_is_the_argmax_of_a_full_forward(model):
    cfg, params, mask, tokens, full = model
    prompt, n_new = tokens[:, :4], 8  # 12 tokens in all: the full forward's shape, compiled once
    out, share = decode.generate(cfg, params, prompt, jax.random.key(0), n_new=n_new, temperature=0.0,
                                 expert_mask=mask)
    logits, gates = full(params, out)
    # each new token is the argmax of the full forward's logits at the position before it
    np.testing.assert_array_equal(out[:, 4:], np.argmax(np.asarray(logits), -1)[:, 3:-1])
    np.testing.assert_array_equal(out[:, :4], prompt)
    np.testing.assert_allclose(share, np.asarray(gates)[..., :1].sum(-1).mean(0), **TOL64)


def test_top_k_sampling():
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 4000))
    draw = jax.jit(decode._sample, static_argnums=(2, 3))
    k2 = np.asarray(draw(jax.random.key(0), logits, 1.0, 2))
    assert set(np.unique(k2)) == {2, 3} and abs((k2 == 3).mean() - 4 / 7) < 0.03
    assert set(np.unique(np.asarray(draw(jax.random.key(1), logits, 5.0, 1)))) == {3}
    everything = np.asarray(draw(jax.random.key(2), logits, 1.0, 0))
    assert abs((everything == 0).mean() - 0.1) < 0.03
