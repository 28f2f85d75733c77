"""Regenerate the golden Llama parity assets with Hugging Face's PyTorch LlamaForCausalLM.

    python3 -m venv /tmp/parity && /tmp/parity/bin/pip install -c constraints.txt torch==2.13.0 transformers safetensors numpy
    /tmp/parity/bin/python tests/assets/make_llama_golden.py

Two small random models with grouped-query attention (4 heads, 2 key/value heads) and RoPE:
  llama_tiny/         tied head, plain RoPE (rope_theta 10000)
  llama_tiny_untied/  its own lm_head, "llama3" rope scaling (with an original context short
                      enough that the test positions cross all three frequency bands)
each in HF format (config.json + model.safetensors), and tests/assets/llama_tiny_golden.npz with
input_ids [2, 16] and each model's reference logits [2, 16, V] (float32), plus the versions.
Every parameter is perturbed away from HF's init (RMSNorm scales 1) so that each one matters to
the logits. Needs torch; the tests that use these files do not.
"""
import os

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
# Small enough that both checkpoints and the logits stay near 200 KB in all.
SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, attention_dropout=0.0)
VARIANTS = {
    "llama_tiny": dict(tie_word_embeddings=True, max_position_embeddings=64,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # head_dim 8 gives wavelengths 2 pi 10000^(i/4) = 6.3, 63, 628, 6283: with an original context
    # of 64 the three llama3 bands (kept < 16 <= interpolated <= 64 < stretched) are all populated.
    "llama_tiny_untied": dict(tie_word_embeddings=False, max_position_embeddings=512,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}),
}


def main():
    ids = torch.randint(0, SIZES["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    out = {"input_ids": ids.numpy().astype(np.int32)}
    for seed, (name, extra) in enumerate(VARIANTS.items()):
        torch.manual_seed(seed)
        config = LlamaConfig(**SIZES, **extra)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.add_(0.05 * torch.randn_like(p))
        out_dir = os.path.join(HERE, name)
        model.save_pretrained(out_dir, safe_serialization=True)
        with torch.no_grad():
            logits = model(ids).logits
        out[f"logits_{name}"] = logits.numpy().astype(np.float32)
        print("wrote", out_dir, "logit scale", float(logits.abs().max()))
    np.savez(os.path.join(HERE, "llama_tiny_golden.npz"), **out,
             versions=np.array([torch.__version__, __import__("transformers").__version__]))


if __name__ == "__main__":
    main()
