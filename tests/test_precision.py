"""The float64 model the two-program tests run in (comigs_jax.model.precision): its attention
against NumPy, its parameters and sums in float64, and the one-line refusal without 64-bit JAX."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comigs_jax import configuration
from comigs_jax.errors import ConfigError
from comigs_jax.model.config import GPT2Config
from comigs_jax.model.gpt2 import init_params
from comigs_jax.model.precision import dot_product_attention, wide
from configs import tiny
from tiny import tiny_cfg


def _numpy_attention(q, k, v, keep):
    """q [B, T, N, H], k, v [B, S, K, H], keep [B, N, T, S] bool, in float64 NumPy."""
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # head n uses kv head n // g
    z = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    z = np.where(keep, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_float64_attention_equals_numpy(heads, kv_heads, x64):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 6, n, 8)) for n in (heads, kv_heads, kv_heads))
    mask = rng.random((2, 1, 6, 6)) > 0.4
    mask[..., 0] = True  # every query sees a key
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, np.broadcast_to(mask, (2, heads, 6, 6))), rtol=1e-12,
                               atol=1e-12)
    causal = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
    np.testing.assert_allclose(causal, _numpy_attention(q, k, v, np.tril(np.ones((6, 6), bool))), rtol=1e-12,
                               atol=1e-12)


def test_float32_attention_is_jax_s():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 4)), jnp.float32) for _ in range(3))
    np.testing.assert_array_equal(dot_product_attention(q, k, v, is_causal=True),
                                  jax.nn.dot_product_attention(q, k, v, is_causal=True))


def test_float64_model_holds_float64_trainable_leaves_and_float32_keeps_float32(x64):
    for dtype, want in (("float64", jnp.float64), ("float32", jnp.float32), ("bfloat16", jnp.float32)):
        params = init_params(tiny_cfg(dtype=dtype), jax.random.key(0))
        lora = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if "lora_A" in str(p) or "_A" in str(p[-1])]
        assert lora and all(x.dtype == want for x in lora), dtype
        assert wide(jnp.dtype(dtype)) == want


def test_float64_without_64_bit_jax_is_one_line():
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match=r"^dtype='float64' needs 64-bit JAX"):
        GPT2Config(dtype="float64")
    c = tiny.get_config()
    c.model.dtype = "float64"
    with pytest.raises(ConfigError, match=r"^config\.model\.dtype='float64' is not allowed: float64 needs 64-bit "
                                          r"JAX \(JAX_ENABLE_X64=1") as e:
        configuration.validate(c)
    assert "\n" not in str(e.value)
