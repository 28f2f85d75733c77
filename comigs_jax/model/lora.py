"""LoRA: a frozen dense layer plus a trainable low-rank correction (method.md §1.2).

Layout is JAX's x·W: kernel [in, out], A [in, rank], B [rank, out]. (peft and the reference
store the transposes: A as [rank, in], B as [out, rank].)
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from comigs_jax.model.config import LoRAConfig
from comigs_jax.model.precision import wide

# A ~ U(-1/sqrt(in), +1/sqrt(in)): torch's kaiming_uniform(a=sqrt(5)) on a [rank, in] weight.
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def expert_a_init(key, shape, dtype=jnp.float32):
    """A for a stack of experts, [E, in, rank]: fan_in is `in`, whatever E."""
    return nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,))(key, shape, dtype)


class LoRADense(nn.Module):
    """y = x W + b + s (dropout(x) A) B, with W, b frozen (role "base") and A, B trainable.

    lora=None gives a plain dense layer: the seam through which GPT-2 becomes CoMiGS.
    use_bias=False: no b (Llama's projections have none). x: [..., in] -> y: [..., features].
    """

    features: int
    lora: Optional[LoRAConfig] = None
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), wide(self.dtype))
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), wide(self.dtype)).astype(self.dtype)
        if self.lora is None:
            return y
        a = self.param("lora_A", lora_a_init, (d_in, self.lora.rank), wide(self.dtype))
        b = self.param("lora_B", nn.initializers.zeros, (self.lora.rank, self.features), wide(self.dtype))
        xd = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic or self.lora.dropout == 0)
        return y + self.lora.scale * ((xd @ a.astype(self.dtype)) @ b.astype(self.dtype))
