"""The model Family record (comigs_jax.model.family): the registry's look-ups, the per-layer access
the export uses, the sown gates decode reads, and a family registered from outside reaching the
engine, the capacity model and the config builder without a change to any of them."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from comigs_jax import capacity, configuration
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.model import family as families
from comigs_jax.model import lm
from comigs_jax.model.config import GPT2Config, LlamaConfig, LoRAConfig, MoEConfig
from comigs_jax.model.hf import CheckpointError
from comigs_jax.train.state import TrainConfig
from configs import capacity as capacity_config

LORA = LoRAConfig(rank=2)
MOE = MoEConfig(n_experts=2, n_generalists=1, top_k=2, lora=LORA)
SMALL = {
    "gpt2": GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, attn_lora=LORA, moe=MOE),
    "llama": LlamaConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_kv_head=1,
                         intermediate_size=32, attn_lora=LORA, moe=MOE),
}


def test_lookups():
    assert families.family_of(GPT2Config()) is families.GPT2 and families.family_of(LlamaConfig()) is families.LLAMA
    assert lm.family_of(LlamaConfig()) == "llama" and families.names() == ("gpt2", "llama")
    with pytest.raises(ValueError, match=r"has family=None: allowed \('gpt2', 'llama'\)"):
        families.family_of(object())
    with pytest.raises(ValueError, match="'bert' is not registered"):
        families.family_named("bert")
    assert families.family_of_size("gpt2-xl") is families.GPT2 and families.family_of_size("llama-3.2-1b") is families.LLAMA
    assert families.family_of_size("gpt3") is None
    assert set(families.named_sizes()) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "smollm2-135m", "llama-3.2-1b"}
    assert families.family_of_hub_id("gpt2-medium") is families.GPT2
    assert families.family_of_hub_id("HuggingFaceTB/SmolLM2-135M") is None
    assert families.GPT2.sized("gpt2-medium", vocab_size=100) == GPT2Config(vocab_size=100, n_embd=1024, n_layer=24,
                                                                            n_head=16)
    assert families.LLAMA.sized("smollm2-135m") == LlamaConfig()  # LlamaConfig's defaults are SmolLM2-135M


@pytest.mark.parametrize("content, expect", [
    ({"model_type": "llama"}, "llama"), ({"model_type": "gpt2"}, "gpt2"), ({}, "gpt2"),
    ({"model_type": "bert"}, "model_type='bert' is not supported"), (None, "config.json is missing"),
    ("not json", "cannot be read"),
])
def test_checkpoint_family(tmp_path, content, expect):
    if content is not None:
        (tmp_path / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    if expect in families.names():
        assert families.checkpoint_family(str(tmp_path)).name == expect == lm.checkpoint_family(str(tmp_path))
    else:
        with pytest.raises(CheckpointError, match=expect):
            families.checkpoint_family(str(tmp_path))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_layers_and_sown_gates(name):
    """layer(i) / layer_subtrees put every layer back where it was; sown_gates of one apply are the
    family's token_gate_weights (what decode colours tokens by)."""
    cfg = SMALL[name]
    fam = families.family_of(cfg)
    params = jax.tree.map(np.asarray, fam.init_params(cfg, jax.random.key(0), 8))
    layers = [fam.layer(params, i) for i in range(cfg.n_layer)]
    back = fam.layer_subtrees(layers)
    assert set(back) == ({"layers"} if name == "llama" else {"h_0", "h_1"})
    for key, sub in back.items():
        jax.tree.map(np.testing.assert_array_equal, sub, params[key])
    if name == "llama":  # layer 1 is the second slice of the scanned stack
        np.testing.assert_array_equal(layers[1]["router"]["kernel"], params["layers"]["router"]["kernel"][1])
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    _, state = fam.module(cfg).apply({"params": params}, tokens, None, mutable=["intermediates"])
    gates = fam.sown_gates(state["intermediates"], cfg.n_layer)
    assert gates.shape == (cfg.n_layer, 2, 8, 2)
    np.testing.assert_allclose(gates, fam.token_gate_weights(cfg, params, tokens), rtol=0, atol=0)


def test_head_matrix():
    gpt2, llama = SMALL["gpt2"], SMALL["llama"]
    untied = dataclasses.replace(llama, tie_word_embeddings=False)
    for cfg in (gpt2, llama, untied):
        params = lm.init_params(cfg, jax.random.key(0))
        head = lm.head_matrix(params, cfg)
        assert head.shape == (cfg.vocab_size, cfg.n_embd)
    p = lm.init_params(untied, jax.random.key(0))
    np.testing.assert_array_equal(lm.head_matrix(p, untied), p["lm_head"]["kernel"].T)


@dataclasses.dataclass(frozen=True)
class TwinConfig(GPT2Config):
    """A new family for the test: GPT-2's shapes and code under another name."""

    family = "twin"


def test_a_registered_family_reaches_every_reader(monkeypatch):
    """What docs/architecture.md's walk-through promises: one Family registered, and lm (module,
    shapes), the capacity model (shapes, per-layer bytes, the plan's label) and the config builder
    (a named size) take it with no change of theirs."""
    twin = dataclasses.replace(families.GPT2, name="twin", label="Twin", config=TwinConfig,
                               sizes={"twin-small": dict(n_embd=32, n_layer=1, n_head=2)}, hub_prefix=None)
    monkeypatch.setitem(families._REGISTRY, "twin", twin)
    base = configuration.base_shape(_capacity_cfg("twin-small"))
    assert type(base) is TwinConfig and (base.n_layer, base.n_embd, base.vocab_size) == (1, 32, 50257)
    cfg = dataclasses.replace(base, vocab_size=64, attn_lora=LORA, moe=MOE)
    plain = GPT2Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPT2Config)})
    shapes = jax.tree.map(lambda s: s.shape, lm.param_shapes(cfg))
    assert shapes == jax.tree.map(lambda s: s.shape, lm.param_shapes(plain))
    assert capacity.shapes(cfg).family == "twin"
    m, tc = get_method("comigs"), TrainConfig(batch_size=2, seq_len=16)
    twin_plan = capacity.plan(configure_model(cfg, m), tc, m, 10)
    gpt2_plan = capacity.plan(configure_model(plain, m), tc, m, 10)
    assert twin_plan["per_user"] == gpt2_plan["per_user"] and twin_plan["config"]["family"] == "twin"
    assert capacity.format_plan(twin_plan).startswith("# Capacity plan: 10 users, Twin 1L x 32 (V 64)")


def _capacity_cfg(base: str):
    c = capacity_config.get_config()
    c.base, c.train.seq_len = base, 16
    return c
