"""Regenerate the golden GPT-2 parity assets with Hugging Face's PyTorch GPT2LMHeadModel.

    python3 -m venv /tmp/parity && /tmp/parity/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/parity/bin/python tests/assets/make_gpt2_golden.py

Writes tests/assets/gpt2_tiny/ (HF format: config.json + model.safetensors) and
tests/assets/gpt2_tiny_golden.npz (input_ids [2, 16] and the reference logits [2, 16, V]).
Every parameter is perturbed away from HF's init (LayerNorm 1/0, biases 0) so that each one
matters to the logits. Needs torch; the tests that use these files do not.
"""
import os

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    out_dir = os.path.join(HERE, "gpt2_tiny")
    model.save_pretrained(out_dir, safe_serialization=True)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    np.savez(os.path.join(HERE, "gpt2_tiny_golden.npz"), input_ids=ids.numpy().astype(np.int32),
             logits=logits.numpy().astype(np.float32),
             versions=np.array([torch.__version__, __import__("transformers").__version__]))
    print("wrote", out_dir, "logit scale", float(logits.abs().max()))


if __name__ == "__main__":
    main()
