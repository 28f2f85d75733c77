"""The model: GPT-2 (gpt2.py), LoRA (lora.py), mixture of experts (moe.py), HF I/O (hf.py)."""
from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig  # noqa: F401
