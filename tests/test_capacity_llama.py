"""The capacity model (comigs_jax.capacity) for the Llama family: parameter counts against the real
parameter tree (SmolLM2-135M, Llama 3.2 1B and small random configs, tied and untied, with and
without adapters), state bytes against init_states, FLOPs against the matmuls of the traced
program (an independent count: every dot_general of the jaxpr), shared bytes, activation profiles,
the compiled round (compile only) and the command line for the named Llama sizes.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.extend import core as jcore

from comigs_jax import capacity
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.federated.roles import filter_roles, label_params, merge, split_base
from comigs_jax.model.config import LLAMA_SIZES, GPT2Config, LlamaConfig, LoRAConfig, MoEConfig
from comigs_jax.model.lm import language_model, param_shapes
from comigs_jax.train.state import TrainConfig, init_states

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LORA = LoRAConfig(rank=8)
MOE = MoEConfig(n_experts=2, n_generalists=1, top_k=2, lora=LORA)


def named(size: str, **kw) -> LlamaConfig:
    return LlamaConfig(**{**LLAMA_SIZES[size], **kw})


def small(**kw) -> LlamaConfig:
    """A small Llama: grouped-query attention, head_dim set apart from n_embd // n_head."""
    return LlamaConfig(**{**dict(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=6, n_kv_head=2,
                                 intermediate_size=80, head_dim=10), **kw})


def tree_counts(cfg) -> dict:
    shapes = param_shapes(cfg)
    counts = dict.fromkeys(("base", "attn", "generalist", "specialist", "router"), 0)
    for leaf, role in zip(jax.tree.leaves(shapes), jax.tree.leaves(label_params(shapes))):
        counts[role] += leaf.size
    return counts


@pytest.mark.parametrize("cfg", [  # the named sizes' widths, heads and vocabularies on 2 layers (tracing is per layer)
    named("smollm2-135m", n_layer=2, attn_lora=LORA, moe=MOE),
    named("llama-3.2-1b", n_layer=2, attn_lora=LORA, moe=MoEConfig(n_experts=4, n_generalists=2, lora=LoRAConfig(rank=4))),
    small(),                                                        # plain, tied
    small(tie_word_embeddings=False),                               # plain, untied lm_head
    small(tie_word_embeddings=False, attn_lora=LoRAConfig(rank=3), moe=MoEConfig(n_experts=3, n_generalists=1,
                                                                                   lora=LoRAConfig(rank=5))),
    small(n_kv_head=6, head_dim=0, moe=MoEConfig(n_experts=2, n_generalists=0, router="uniform", lora=LORA)),
    small(moe=MoEConfig(n_experts=4, n_generalists=1, top_k=2, router="noisy_topk", lora=LORA)),  # w_gate + w_mix
], ids=["smollm2-135m", "llama-3.2-1b", "small-tied", "small-untied", "small-untied-adapters", "small-mha-uniform",
        "small-noisy-topk"])
def test_param_counts_match_the_parameter_tree(cfg):
    got, tree = capacity.param_counts(cfg), tree_counts(cfg)
    for role in tree:
        assert got[role] == tree[role], (role, got, tree)
    assert got["trainable"] == sum(tree[r] for r in ("attn", "generalist", "specialist", "router"))
    if cfg.moe is not None:
        assert got["generalist"] + got["specialist"] == got["expert_each"] * cfg.moe.n_experts


def test_named_sizes_are_the_published_parameter_counts():
    """All layers: SmolLM2-135M's and Llama 3.2 1B's published sizes (counts are linear in layers,
    checked per layer against the tree above)."""
    assert capacity.param_counts(named("smollm2-135m"))["base"] == 134_515_008
    assert capacity.param_counts(named("llama-3.2-1b"))["base"] == 1_235_814_400
    # untied: one more [V, d] (the lm_head)
    untied = capacity.param_counts(named("smollm2-135m", tie_word_embeddings=False))["base"]
    assert untied == 134_515_008 + 49152 * 576


@pytest.mark.parametrize("method, faithful", [("comigs", False), ("comigs", True), ("fedavg", False)])
def test_state_bytes_match_init_states(method, faithful):
    m = get_method(method)
    cfg = configure_model(small(tie_word_embeddings=False, attn_lora=LORA, moe=MoEConfig(n_experts=3, n_generalists=1,
                                                                                        lora=LORA)), m)
    tc = TrainConfig(local_steps=2, batch_size=2, seq_len=16, router_every=2, router_steps=1, faithful=faithful)
    states = jax.eval_shape(lambda k: init_states(cfg, tc, m, k, 1, cfg.moe.n_specialists), jax.random.key(0))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states))
    assert capacity.state_bytes(cfg, tc, m)["total"] == nbytes


def test_shared_bytes_tied_and_untied():
    tied, untied = small(dtype="bfloat16"), small(dtype="bfloat16", tie_word_embeddings=False)
    V, d = 300, 48
    st, su = capacity.shared_bytes(tied), capacity.shared_bytes(untied)
    assert st["base_f32"] == 4 * capacity.param_counts(tied)["base"] and st["embed_transposed"] == 2 * V * d
    assert su["base_f32"] == st["base_f32"] + 4 * V * d and su["lm_head_transposed"] == 2 * V * d
    # the frozen kernels in bf16: neither the embedding nor the untied head (the head is counted once)
    assert su["base_cast"] == st["base_cast"] == 2 * (capacity.param_counts(tied)["base"] - V * d)
    assert capacity.shared_bytes(small())["base_cast"] == 0  # float32: nothing to cast


# ----------------------------------------------------------------------------- FLOPs

def dot_flops(jaxpr, mult: int = 1) -> int:
    """2 m k n of every dot_general of a jaxpr (sub-jaxprs included, scans times their length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[i] for i in contract)
            total += mult * 2 * math.prod(eqn.outvars[0].aval.shape) * k
        inner = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for v in eqn.params.values():
            for j in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(j, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                    total += dot_flops(j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j, inner)
    return total


@pytest.mark.parametrize("cfg", [
    small(tie_word_embeddings=False, attn_lora=LoRAConfig(rank=4),
          moe=MoEConfig(n_experts=3, n_generalists=1, lora=LoRAConfig(rank=6))),
    GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=6, attn_lora=LoRAConfig(rank=4),
               moe=MoEConfig(n_experts=3, n_generalists=1, lora=LoRAConfig(rank=6))),
], ids=["llama-gqa-untied", "gpt2"])
def test_step_flops_equal_the_traced_matmuls(cfg):
    """The forward's matmuls (the full-logits loss, the balance loss's block-output router
    included) and the expert step's (jax.grad with respect to the expert roles) counted on the
    jaxpr. The convention counts layer 0's attention LoRA input gradients but not its frozen
    projections' (their input is the frozen embedding): an unrolled model's gradient skips both, a
    scanned one (the same body for every layer) computes both."""
    batch, seq = 2, 16
    base, trainable = split_base(param_shapes(cfg))
    experts, routers = filter_roles(trainable, ("attn", "generalist", "specialist")), filter_roles(trainable, ("router",))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(e, r, b, tok):
        logits, aux = language_model(cfg).apply({"params": merge(b, e, r)}, tok)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok).mean() + 0.01 * aux["lb"].mean()

    count = lambda f: dot_flops(jax.make_jaxpr(f)(experts, routers, base, tokens).jaxpr)
    s = capacity.step_flops(cfg, batch, seq)
    n, r = batch * seq, cfg.attn_lora.rank
    first = capacity.shapes(cfg).attn[:-1]  # layer 0's projections of the block input
    layer0_lora_input_grads = sum(2 * n * r * d_in for _, d_in, _ in first)
    assert count(loss) == s["forward"]
    if "layers" in base:  # the blocks as one lax.scan: layer 0's input gradients are computed too
        expected = s["expert_step"] + sum(2 * n * d_in * d_out for _, d_in, d_out in first)
    else:  # unrolled: JAX skips what only the frozen embedding would need
        expected = s["expert_step"] - layer0_lora_input_grads
    assert count(jax.grad(loss, 0)) == expected


def test_smollm2_flops_by_hand():
    """SmolLM2-135M's forward per token, counted differently: 2 x the frozen matmul parameters
    (every kernel but the embedding, plus the tied head), attention over all 9 query heads."""
    cfg = named("smollm2-135m")
    d, L, V, F, T = 576, 30, 49152, 1536, 128
    kernels = L * (d * 576 + 2 * d * 192 + 576 * d + 3 * d * F)  # q, k, v (3 kv heads x 64), o, gate, up, down
    assert kernels == capacity.param_counts(cfg)["base"] - V * d - (2 * L + 1) * d
    per_token = 2 * (kernels + V * d) + L * 2 * 2 * T * 576  # + Q K^T and P V of every layer
    assert capacity.step_flops(cfg, 1, T)["forward"] == T * per_token


# ----------------------------------------------------------------------------- activations

def test_activation_profiles():
    cfg = configure_model(named("smollm2-135m", dtype="bfloat16", attn_lora=LORA, moe=MOE), get_method("comigs"))
    kept = {}
    for remat in ("none", "block", "moe"):
        c = dataclasses.replace(cfg, remat=remat)
        kept[remat] = sum(e * b for _, e, b in capacity.activation_tensors(c, 8, 128))
        cpu = sum(e * b for _, e, b in capacity.activation_tensors(c, 8, 128, "cpu"))
        assert cpu == sum(e * b for _, e, b in capacity.activation_tensors(cfg, 8, 128, "cpu"))  # cpu ignores remat
    assert kept["block"] < kept["moe"] < kept["none"]
    # the lean SwiGLU core keeps both pre-activations [E, N, F] per layer (accelerator profile)
    names = {name.split(".", 1)[1]: e for name, e, _ in capacity.activation_tensors(cfg, 8, 128) if name.startswith("L0.")}
    assert names["moe expert gate and up pre-activations 2 x [E,N,F]"] == 2 * 2 * 8 * 128 * 1536
    # grouped-query attention keeps k, v of 3 heads, not 9
    mha = dataclasses.replace(cfg, n_kv_head=9)
    qkv = lambda c: next(e for n, e, _ in capacity.activation_tensors(c, 8, 128) if n.startswith("L0.attn q, k, v"))
    assert qkv(cfg) == 2 * 8 * 128 * (9 + 2 * 3) * 64 and qkv(mha) == 2 * 8 * 128 * 27 * 64
    with pytest.raises(ValueError, match="profile='gpu'"):
        capacity.activation_tensors(cfg, 8, 128, profile="gpu")
    with pytest.raises(ValueError, match="family"):
        capacity.shapes(object())


def test_compiled_round_of_a_tiny_llama_against_the_cpu_profile():
    """measure() compiles the Llama round (compile only) through comigs_jax.model.lm; the cpu
    profile's totals and marginal bytes per user against XLA's memory_analysis()."""
    method = get_method("comigs")
    cfg = configure_model(LlamaConfig(vocab_size=512, n_positions=32, n_embd=64, n_layer=1, n_head=4, n_kv_head=2,
                                      intermediate_size=192, attn_lora=LORA, moe=MOE), method)
    tc = TrainConfig(local_steps=2, batch_size=2, seq_len=32, router_every=2, router_steps=1)
    m = capacity.measure(cfg, tc, method, (2, 6), profile="cpu", train_tokens=1024, valid_tokens=512,
                         compiler_options=FAST)
    for u in (2, 6):  # (the arguments are mostly the shared base here; its derived copies are counted there)
        assert 0.75 <= m["per_u"][u]["ratio"] <= 1.25, m
        assert 0.75 <= m["per_u"][u]["arguments_ratio"] <= 1.25, m
    assert 0.75 <= m["ratio_marginal"] <= 1.25, m


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("size, head", [("smollm2-135m", "Llama 30L x 576 (V 49,152)"),
                                        ("llama-3.2-1b", "Llama 16L x 2048 (V 128,256)")])
def test_capacity_command_line_llama_sizes(size, head, capsys):
    """vocab_size 0 (the default) is the named base's own vocabulary."""
    assert capacity.main(["comigs_jax.capacity", f"--config.base={size}", "--config.targets=h200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Capacity plan: 1,000 users, {head}, comigs (1G + 1S), batch 64 x 128, bfloat16")
    assert "| NVIDIA H200 141 GB |" in out and "embed_transposed" in out
    assert capacity.main(["comigs_jax.capacity", f"--config.base={size}", "--config.vocab_size=1000",
                          "--config.targets=h200"]) == 0
    assert "(V 1,000)" in capsys.readouterr().out


@pytest.mark.parametrize("flag, names", [
    ("--config.vocab_size=-1", "config.vocab_size=-1 is not allowed: 0 (the base's own vocabulary) or an integer >= 2"),
    ("--config.vocab_size=1", "config.vocab_size=1 is not allowed"),
    ("--config.base=llama-3.2-8b", "config.base='llama-3.2-8b' is not allowed"),
    ("--config.base=smollm2-135m --config.train.seq_len=9000", "config.train.seq_len=9000"),
])
def test_capacity_llama_command_line_errors_are_one_line(flag, names, capsys):
    assert capacity.main(["comigs_jax.capacity", *flag.split()]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert out == ""
