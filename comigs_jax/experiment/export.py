"""Users' models of a finished run as folders other tools read (`python -m experiments.export`),
and the loader that rebuilds the Flax model from such a folder.

    export_run("runs/demo", "exported", users=["user0"])   # exported/user0/...
    model = load_exported("exported/user0")                # a generation.UserModel
    logits, _ = lm.language_model(model.model_cfg).apply({"params": model.params}, tokens,
                                                         jnp.asarray(model.expert_mask))

One user's folder (docs/export.md has every tensor's name and shape):

    base/                    the frozen base, HF format (GPT2LMHeadModel / LlamaForCausalLM:
                             config.json, model.safetensors, the tokenizer for text data)
    attn_adapter/            the attention LoRA as a peft adapter (adapter_config.json,
                             adapter_model.safetensors); absent when the run had none
    experts.safetensors      the MLP's LoRA experts (generalists first) and the routers
    comigs.json              what rebuilds the model: family, adapters' configs, expert mask, user

With the mixture left out (the base MLP in place of the experts), base/ + attn_adapter/ is a plain
`transformers` + `peft` model (tests/assets/make_export_golden.py checks it against ours).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterable, Optional

import numpy as np

from comigs_jax.experiment.restore import RestoreError, open_run, restore_rows
from comigs_jax.model.family import family_of

FORMAT = "comigs_jax.export/1"
META, BASE, ADAPTER, EXPERTS = "comigs.json", "base", "attn_adapter", "experts.safetensors"


class ExportError(RestoreError):
    """An export cannot be written or read (one line)."""


# ----------------------------------------------------------------------------- layers
def _layer(params: dict, cfg, i: int) -> dict:
    """Layer i's parameter subtree (a scanned family's [L, ...] leaves indexed)."""
    return family_of(cfg).layer(params, i)


def _set_layers(params: dict, cfg, layers: list) -> None:
    """Put per-layer subtrees (merged into what params already holds) back in place."""
    from comigs_jax.federated.roles import merge
    for key, sub in family_of(cfg).layer_subtrees(layers).items():
        params[key] = merge(params.get(key, {}), sub)


# ----------------------------------------------------------------------------- write
def _adapter_tensors(params: dict, cfg) -> tuple[dict, dict]:
    """(peft adapter_config.json dict, adapter_model.safetensors tensors) of the attention LoRA.
    peft's lora_A.weight is [r, in] and lora_B.weight [out, r] (nn.Linear's), our A [in, r] and B
    [r, out] transposed; Conv1D's fan_in_fan_out only changes how peft merges, not these shapes."""
    names = family_of(cfg).hf_names
    prefix, attn, projs, conv1d = names.layer_prefix, names.attn, names.projections, names.conv1d
    lora = cfg.attn_lora
    tensors = {}
    for i in range(cfg.n_layer):
        layer = _layer(params, cfg, i)
        for p in projs:
            name = f"base_model.model.{prefix.format(i)}.{attn}.{p}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(layer[attn][p]["lora_A"], np.float32).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(layer[attn][p]["lora_B"], np.float32).T)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "../" + BASE,
        "r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": lora.scaling == "rslora",
        "lora_dropout": lora.dropout, "fan_in_fan_out": conv1d, "bias": "none",
        # "attn.c_proj", not "c_proj": GPT-2's MLP has a c_proj too (peft matches name suffixes)
        "target_modules": [f"{attn}.{p}" for p in projs], "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True,
    }
    return config, tensors


def _expert_tensors(params: dict, cfg) -> dict:
    """experts.safetensors: per layer i, with P the HF prefix of the layer and E every expert slot
    (generalists first), in nn.Linear's orientation:
    P.mlp.experts.<m>.lora_A [E, r, in], P.mlp.experts.<m>.lora_B [E, out, r] for each MLP
    matmul m, and P.router.weight [E, d] (a token router) or P.router.logits [E] (a per-user router,
    the same logits for every token); neither with a uniform router."""
    names = family_of(cfg).hf_names
    prefix, matmuls = names.layer_prefix, names.expert_matmuls
    out = {}
    for i in range(cfg.n_layer):
        layer = _layer(params, cfg, i)
        groups = [layer["mlp"][g] for g in ("generalists", "specialists") if g in layer["mlp"]]
        for m in matmuls:
            for ab, perm in (("A", (0, 2, 1)), ("B", (0, 2, 1))):
                stacked = np.concatenate([np.asarray(g[f"{m}_{ab}"], np.float32) for g in groups], 0)
                out[f"{prefix.format(i)}.mlp.experts.{m}.lora_{ab}"] = np.ascontiguousarray(stacked.transpose(perm))
        router = layer.get("router", {})
        if "kernel" in router:
            out[f"{prefix.format(i)}.router.weight"] = np.ascontiguousarray(np.asarray(router["kernel"], np.float32).T)
        if "logits" in router:
            out[f"{prefix.format(i)}.router.logits"] = np.ascontiguousarray(np.asarray(router["logits"], np.float32))
    return out


def _lora_dict(lora) -> Optional[dict]:
    return None if lora is None else dataclasses.asdict(lora)


_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _fix_token_ids(base: str, vocab_size: int, source: Optional[str]) -> None:
    """base/config.json's special token ids: the original base's (its config.json), else only
    those inside the vocabulary (a small synthetic vocabulary has no GPT-2 <|endoftext|>)."""
    path = os.path.join(base, "config.json")
    with open(path) as f:
        hf = json.load(f)
    original = {}
    if source and os.path.exists(os.path.join(source, "config.json")):
        with open(os.path.join(source, "config.json")) as f:
            original = json.load(f)
    for key in _TOKEN_IDS:
        value = original.get(key, hf.get(key))
        hf[key] = value if isinstance(value, int) and 0 <= value < vocab_size else None
    with open(path, "w") as f:
        json.dump(hf, f, indent=2)


def write_user_folder(out_dir: str, model_cfg, params: dict, expert_mask, tokenizer=None, info: Optional[dict] = None,
                      base_source: Optional[str] = None) -> None:
    """Write one user's model (params: base and adapters, as the Flax model holds them) as the
    folder this module's docstring describes. `info` (user, run, method) goes into comigs.json;
    base_source: the base's original HF directory, whose special token ids base/config.json keeps."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, BASE)
    family_of(model_cfg).save(params, model_cfg.base, base, tokenizer)
    _fix_token_ids(base, model_cfg.vocab_size, base_source)
    if model_cfg.attn_lora is not None:
        config, tensors = _adapter_tensors(params, model_cfg)
        os.makedirs(os.path.join(out_dir, ADAPTER), exist_ok=True)
        save_file(tensors, os.path.join(out_dir, ADAPTER, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, ADAPTER, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    moe = model_cfg.moe
    mask = [bool(m) for m in np.asarray(expert_mask)]
    meta = {
        "format": FORMAT, **(info or {}), "family": model_cfg.family,
        "attn_lora": _lora_dict(model_cfg.attn_lora),
        "moe": None if moe is None else {**dataclasses.asdict(moe), "lora": _lora_dict(moe.lora)},
        "expert_mask": mask, "synthetic": tokenizer is None,
    }
    if moe is not None:
        save_file(_expert_tensors(params, model_cfg), os.path.join(out_dir, EXPERTS),
                  metadata={"format": FORMAT, "n_experts": str(moe.n_experts), "n_generalists": str(moe.n_generalists),
                            "expert_mask": ",".join(str(int(m)) for m in mask)})
    with open(os.path.join(out_dir, META), "w") as f:  # last: a folder with comigs.json is complete
        json.dump(meta, f, indent=2)


# ----------------------------------------------------------------------------- read
def load_exported(folder: str, mixture: bool = True):
    """The user's Flax model rebuilt from an export folder: a generation.UserModel (model_cfg,
    params, expert_mask, tokenizer; `.generate` samples from it). mixture=False leaves the
    experts and routers out (the base MLP in their place): the model base/ + attn_adapter/ are in
    transformers + peft. ExportError (one line) for a folder that is not an export."""
    import dataclasses as dc

    from comigs_jax.experiment.generation import UserModel
    from comigs_jax.model.config import LoRAConfig, MoEConfig
    from comigs_jax.model.hf import _flatten, load_tokenizer
    from comigs_jax.model.hf import read_safetensors
    from comigs_jax.model.lm import load_checkpoint, param_shapes

    path = os.path.join(folder, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} cannot be read ({type(e).__name__}): {folder} is not a comigs_jax export") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    base_cfg, params = load_checkpoint(os.path.join(folder, BASE))
    lora = None if meta["attn_lora"] is None else LoRAConfig(**meta["attn_lora"])
    moe = None
    if meta["moe"] is not None and mixture:
        moe = MoEConfig(**{**meta["moe"], "lora": LoRAConfig(**meta["moe"]["lora"])})
    cfg = dc.replace(base_cfg, attn_lora=lora, moe=moe)
    names = family_of(cfg).hf_names
    prefix, attn, projs, matmuls = names.layer_prefix, names.attn, names.projections, names.expert_matmuls
    layers = [{} for _ in range(cfg.n_layer)]
    if lora is not None:
        t = read_safetensors(os.path.join(folder, ADAPTER, "adapter_model.safetensors"))
        for i, layer in enumerate(layers):
            for p in projs:
                name = f"base_model.model.{prefix.format(i)}.{attn}.{p}"
                layer.setdefault(attn, {})[p] = {"lora_A": t[f"{name}.lora_A.weight"].T, "lora_B": t[f"{name}.lora_B.weight"].T}
    if moe is not None:
        t = read_safetensors(os.path.join(folder, EXPERTS))
        g = moe.n_generalists
        for i, layer in enumerate(layers):
            mlp = layer.setdefault("mlp", {})
            for m in matmuls:
                for ab in ("A", "B"):
                    arr = t[f"{prefix.format(i)}.mlp.experts.{m}.lora_{ab}"].transpose(0, 2, 1)
                    for group, part in (("generalists", arr[:g]), ("specialists", arr[g:])):
                        if len(part):
                            mlp.setdefault(group, {})[f"{m}_{ab}"] = part
            if moe.router == "learned":
                layer["router"] = {"kernel": t[f"{prefix.format(i)}.router.weight"].T}
            elif moe.router == "user":
                layer["router"] = {"logits": t[f"{prefix.format(i)}.router.logits"]}
    _set_layers(params, cfg, layers)
    want = {p: tuple(s.shape) for p, s in _flatten(param_shapes(cfg)).items()}
    got = {p: tuple(np.shape(v)) for p, v in _flatten(params).items()}
    if want != got:
        bad = sorted(set(want.items()) ^ set(got.items()))[:2]
        raise ExportError(f"{folder}: the tensors do not fit the model comigs.json describes ({bad})")
    n_e = 1 if moe is None else moe.n_experts
    mask = np.asarray(meta["expert_mask"], bool) if moe is not None else np.ones((n_e,), bool)
    tokenizer = None if meta.get("synthetic", True) else load_tokenizer(os.path.join(folder, BASE))
    return UserModel(meta.get("user", ""), folder, cfg, params, mask, int(cfg.n_positions),
                     bool(meta.get("synthetic", True)), tokenizer, 0 if moe is None else moe.n_generalists)


# ----------------------------------------------------------------------------- a run
def check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"--out={out} exists and is not an empty folder: nothing is overwritten; "
                          "pass a new or empty folder")


def export_run(workdir: str, out: str, users: Optional[Iterable[str]] = None, log=print) -> list[str]:
    """Write OUT/<user>/ for each of `users` (None: every user) of the workdir's finished run;
    the folders written. One-line errors (RestoreError / ExportError) before anything is written
    for a workdir with no finished run, an unknown user, or an `out` that exists and is not empty."""
    check_out(out)
    run = open_run(workdir, users)
    names = run.users if users is None else list(users)
    if run.model_cfg.moe is not None and run.model_cfg.moe.router == "noisy_topk":  # its two kernels have no format yet
        raise ExportError(f"{workdir}: model.router_kind='noisy_topk' runs cannot be exported yet (learned and user routers can)")
    rows = restore_rows(run)
    tokenizer = run.tokenizer()
    tmp = out.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    written = []
    try:
        for user in names:
            params, mask = run.user_params(user, rows)
            write_user_folder(os.path.join(tmp, user), run.model_cfg, params, mask, tokenizer,
                              {"user": user, "run": os.path.abspath(run.run_dir), "method": run.method.name},
                              base_source=run.base_directory)
            written.append(os.path.join(out, user))
            log(f"exported {user} -> {os.path.join(out, user)}")
        check_out(out)  # still new or empty: then the whole export appears at once
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
