"""comigs_jax: CoMiGS (collaborative mixtures of LoRA generalists and specialists) in JAX/Flax."""

__version__ = "0.1.0"
