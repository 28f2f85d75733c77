"""`python -m experiments.export` and comigs_jax.experiment.export.load_exported: the exported
folder rebuilds each user's trained model (the session's finished tiny GPT-2 run; a random Llama),
its attention adapter is a peft adapter whose logits in transformers + peft (golden file) are ours
with the mixture left out, and bad input is one line with nothing written."""
import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comigs_jax.experiment import export, restore
from comigs_jax.model import lm
from experiments import export as export_cli

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
GOLDEN = os.path.join(ASSETS, "export_tiny_golden.npz")


def run_cli(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export_cli.main(["experiments.export", *args])
    return code, out.getvalue(), err.getvalue()


def logits(model_cfg, params, tokens, mask):
    return np.asarray(lm.language_model(model_cfg).apply({"params": params}, tokens, jnp.asarray(mask))[0])


def test_round_trip_equals_the_trained_models(tiny_reference, tmp_path):
    wd = tiny_reference[0]
    out = str(tmp_path / "exported")
    code, stdout, err = run_cli([f"--workdir={wd}", "--all", f"--out={out}"])
    assert code == 0, err
    run = restore.open_run(wd)
    rows = restore.restore_rows(run)
    assert sorted(os.listdir(out)) == sorted(run.users)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, run.model_cfg.vocab_size, (2, 12)))
    for user in run.users:
        folder = os.path.join(out, user)
        assert sorted(os.listdir(folder)) == ["attn_adapter", "base", "comigs.json", "experts.safetensors"]
        params, mask = run.user_params(user, rows)
        model = export.load_exported(folder)
        assert model.model_cfg == run.model_cfg and model.expert_mask.tolist() == mask.tolist()
        np.testing.assert_array_equal(logits(model.model_cfg, model.params, tokens, model.expert_mask),
                                      logits(run.model_cfg, params, tokens, mask))
        cfg = json.load(open(os.path.join(folder, "attn_adapter", "adapter_config.json")))
        assert cfg["fan_in_fan_out"] is True and cfg["use_rslora"] is True and cfg["target_modules"] == ["attn.c_attn", "attn.c_proj"]
    code, _, err = run_cli([f"--workdir={wd}", f"--user={run.users[1]}", f"--out={tmp_path / 'one'}"])
    assert code == 0 and os.listdir(tmp_path / "one") == [run.users[1]], err


def test_llama_round_trip(tmp_path):
    """A Llama with a per-user router (comigs_user_router: P.router.logits; the token router's
    P.router.weight is the GPT-2 run's test above)."""
    from comigs_jax.model.config import LlamaConfig, LoRAConfig, MoEConfig
    cfg = LlamaConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=48,
                      tie_word_embeddings=False, attn_lora=LoRAConfig(rank=2, alpha=4.0),
                      moe=MoEConfig(n_experts=3, n_generalists=2, lora=LoRAConfig(rank=2, alpha=4.0, scaling="lora"),
                                    router="user"))
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05, lm.init_params(cfg, jax.random.key(0)))  # B != 0
    mask = np.array([True, True, True])
    export.write_user_folder(str(tmp_path / "u"), cfg, params, mask)
    model = export.load_exported(str(tmp_path / "u"))
    assert model.model_cfg == cfg
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 10)))
    np.testing.assert_array_equal(logits(cfg, model.params, tokens, mask), logits(cfg, params, tokens, mask))


@pytest.mark.skipif(not os.path.exists(GOLDEN), reason="tests/assets/export_tiny_golden.npz is absent "
                    "(tests/assets/make_export_golden.py writes it, with torch and peft)")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_adapter_matches_transformers(family):
    golden = np.load(GOLDEN)
    model = export.load_exported(os.path.join(ASSETS, "export_tiny", family), mixture=False)
    assert model.model_cfg.moe is None and model.model_cfg.attn_lora is not None
    ours = logits(model.model_cfg, model.params, jnp.asarray(golden["input_ids"]), model.expert_mask)
    np.testing.assert_allclose(ours, golden[f"{family}_logits"], atol=2e-5, rtol=0)
    assert np.abs(golden[f"{family}_logits"] - golden[f"{family}_base_logits"]).max() > 0.1  # the adapter matters


def test_bad_input_is_one_line_and_writes_nothing(tiny_reference, tmp_path):
    wd = tiny_reference[0]
    names = [u["user"] for u in restore.run_results(wd)["users"]]
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [
        ([f"--workdir={empty}", "--all", f"--out={tmp_path / 'a'}"], "holds no finished run", tmp_path / "a"),
        ([f"--workdir={wd}", "--user=nobody", f"--out={tmp_path / 'b'}"],
         f"unknown user 'nobody': this run's users are {', '.join(names)}", tmp_path / "b"),
        ([f"--workdir={wd}", "--all", f"--out={full}"], "exists and is not an empty folder", None),
        ([f"--workdir={wd}", f"--out={tmp_path / 'c'}"], "one of --user=NAME or --all", tmp_path / "c"),
    ]
    for args, what, not_written in cases:
        code, out, err = run_cli(args)
        assert code == 1 and out == "", (args, out)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], (args, err)
        assert not_written is None or not os.path.exists(not_written)
    assert os.listdir(full) == ["keep.txt"] and (full / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"]  # no half-written output anywhere
