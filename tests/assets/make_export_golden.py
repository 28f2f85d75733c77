"""Golden parity of the export's peft adapter: two exported users (GPT-2 and Llama) loaded in
Hugging Face transformers + peft, whose logits ours must match with the mixture left out.

    # 1. the export folders, written by comigs_jax (the project's venv):
    .venv/bin/python tests/assets/make_export_golden.py export
    # 2. their logits in transformers + peft (torch and peft: setup.cfg's `parity` extra):
    python3 -m venv /tmp/parity && /tmp/parity/bin/pip install -c constraints.txt torch==2.13.0 peft==0.21.2 transformers safetensors numpy
    /tmp/parity/bin/python tests/assets/make_export_golden.py golden

Step 1 writes tests/assets/export_tiny/{gpt2,llama}/ (comigs_jax.experiment.export's folder
layout, docs/export.md) from small random models with attention LoRA (GPT-2: rsLoRA on c_attn and
c_proj, Conv1D; Llama: plain LoRA scaling alpha/r on q/k/v/o_proj, grouped-query attention) and
a mixture of experts, every adapter factor perturbed away from its init (B = 0) so each one
matters. Step 2 loads each folder's base/ with AutoModelForCausalLM and attn_adapter/ with
peft.PeftModel.from_pretrained, and writes tests/assets/export_tiny_golden.npz: input_ids [2, 12],
the logits [2, 12, V] of each family, the adapter's effect (logits without the adapter) and the
versions. tests/test_export.py checks ours against it; torch is not needed there.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "export_tiny")
GOLDEN = os.path.join(HERE, "export_tiny_golden.npz")


def export():
    import dataclasses
    import shutil

    import jax

    from comigs_jax.experiment.export import write_user_folder
    from comigs_jax.model import lm
    from comigs_jax.model.config import GPT2Config, LlamaConfig, LoRAConfig, MoEConfig

    moe = MoEConfig(n_experts=3, n_generalists=1, top_k=2, lora=LoRAConfig(rank=2, alpha=8.0))
    configs = {
        "gpt2": GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                           attn_lora=LoRAConfig(rank=4, alpha=16.0, scaling="rslora"), moe=moe),
        "llama": LlamaConfig(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                             intermediate_size=64, rope_theta=10000.0,
                             attn_lora=LoRAConfig(rank=4, alpha=8.0, scaling="lora"), moe=moe),
    }
    shutil.rmtree(OUT, ignore_errors=True)
    for seed, (family, cfg) in enumerate(configs.items()):
        params = lm.init_params(cfg, jax.random.key(seed))
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
        params = jax.tree_util.tree_unflatten(
            tree, [np.asarray(x + 0.05 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
        mask = np.array([True, True, False])  # a user with 2 of the 3 expert slots
        write_user_folder(os.path.join(OUT, family), cfg, params, mask, None, {"user": f"tiny_{family}"})
        print("wrote", os.path.join(OUT, family), dataclasses.asdict(cfg.attn_lora))


def golden():
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    out = {"input_ids": ids.numpy().astype(np.int32),
           "versions": np.array([torch.__version__, transformers.__version__, peft.__version__])}
    for family in ("gpt2", "llama"):
        folder = os.path.join(OUT, family)
        base = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base"), dtype=torch.float32).eval()
        with torch.no_grad():
            plain = base(ids).logits.numpy()
        model = PeftModel.from_pretrained(base, os.path.join(folder, "attn_adapter")).eval()
        with torch.no_grad():
            logits = model(ids).logits.numpy()
        out[f"{family}_logits"] = logits.astype(np.float32)
        out[f"{family}_base_logits"] = plain.astype(np.float32)
        print(family, "adapter changes the logits by", float(np.abs(logits - plain).max()))
    np.savez(GOLDEN, **out)
    print("wrote", GOLDEN)


if __name__ == "__main__":
    {"export": export, "golden": golden}[sys.argv[1]]()
