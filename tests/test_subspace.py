"""SubspaceLoRA: W = R + U C V^T with U, V the frozen top-k singular vectors of W and the core C trained from C0."""

import copy
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_ext import SubspaceLoraConfig, SubspaceLoraLayer, disable_bnb_cpu_repack, export_to_lora

from .conftest import (
    Toy,
    outputs_under_vanilla_peft,
    perturb_trainables,
    same_state,
    save_tiny_bert_classifier,
    state_of,
    tiny_bert,
    token_batches,
)

CASES = [("full", False), ("diag", False), ("full", True), ("diag", True)]


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _projector(q):
    q = q.double()
    return q @ q.T


def _reference_top_k(w, k):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


# ------------------------------------------------------------------ function and decomposition at init
@pytest.mark.parametrize("core,train_residual", CASES)
def test_function_unchanged_at_init_toy_and_bert(core, train_residual):
    toy = Toy()
    base = copy.deepcopy(toy)
    model = get_peft_model(toy, SubspaceLoraConfig(k=3, core=core, train_residual=train_residual,
                                                   target_modules=["q", "k", "out"]))
    x = torch.randn(6, 8)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # C = C0 exactly: the delta is exactly 0

    bert = tiny_bert()
    bert_base = copy.deepcopy(bert)
    model = get_peft_model(bert, SubspaceLoraConfig(k=4, core=core, train_residual=train_residual,
                                                    target_modules=["query", "key", "value", "dense"]))
    assert sum(isinstance(m, SubspaceLoraLayer) for m in model.modules()) == 2 * 6 + 1  # + the pooler
    batch = token_batches(n_batches=1)[0]
    with torch.no_grad():
        assert torch.allclose(model(**batch).last_hidden_state, bert_base(**batch).last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("core", ["full", "diag"])
def test_U_V_C0_are_the_exact_top_k_singular_triplets(core):
    k = 3
    model = get_peft_model(Toy(), SubspaceLoraConfig(k=k, core=core, target_modules=["q", "out"]))
    for name in ("q", "out"):
        layer = getattr(model.base_model.model, name)
        w = layer.get_base_layer().weight
        u_ref, s_ref, v_ref = _reference_top_k(w, k)
        u, v, c0 = (layer.subspace_U["default"], layer.subspace_V["default"], layer.subspace_C0["default"])
        assert u.shape == (w.shape[0], k) and v.shape == (w.shape[1], k) and u.dtype == torch.float32
        # same subspaces (projectors are blind to the sign freedom of an SVD), orthonormal bases
        assert torch.allclose(_projector(u), _projector(u_ref), atol=1e-5)
        assert torch.allclose(_projector(v), _projector(v_ref), atol=1e-5)
        assert torch.allclose(u.double().T @ u.double(), torch.eye(k, dtype=torch.float64), atol=1e-5)
        s = c0 if core == "diag" else torch.diagonal(c0)
        assert torch.allclose(s.double(), s_ref, rtol=1e-5)
        if core == "full":
            assert c0.shape == (k, k) and torch.equal(c0, torch.diag(s))
        assert torch.equal(layer.subspace_C["default"].detach(), c0)
        # U C0 V^T is the best rank-k approximation of W (so R = W - U C0 V^T is the SVD tail)
        approx = u.double() @ torch.diag(s.double()) @ v.double().T
        assert torch.allclose(approx, u_ref @ torch.diag(s_ref) @ v_ref.T, atol=1e-5)
    # float64 weights give a float64 decomposition
    model64 = get_peft_model(Toy().double(), SubspaceLoraConfig(k=k, core=core, target_modules=["q"]))
    layer = model64.base_model.model.q
    assert layer.subspace_U["default"].dtype == torch.float64 == layer.subspace_C["default"].dtype
    u_ref, _, _ = _reference_top_k(layer.get_base_layer().weight, k)
    assert torch.allclose(_projector(layer.subspace_U["default"]), _projector(u_ref), atol=1e-12)


class _Planted(nn.Module):
    """One linear layer whose weight has a planted spectrum with a clear gap after the 5th singular value."""

    def __init__(self, out_f=96, in_f=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        qu, _ = torch.linalg.qr(torch.randn(out_f, in_f, generator=g, dtype=torch.float64))
        qv, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
        s = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0]), torch.linspace(0.1, 0.01, in_f - 5)]).double()
        self.lin = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_((qu @ torch.diag(s) @ qv.T).float())

    def forward(self, x):
        return self.lin(x)


def test_randomized_path_agrees_with_exact_on_a_spectral_gap():
    exact = get_peft_model(_Planted(), SubspaceLoraConfig(k=5, target_modules=["lin"]))
    randomized = get_peft_model(_Planted(), SubspaceLoraConfig(k=5, target_modules=["lin"], exact_max_dim=0))
    a, b = exact.base_model.model.lin, randomized.base_model.model.lin
    for buf in ("subspace_U", "subspace_V"):
        cos = torch.linalg.svdvals(a.__getattr__(buf)["default"].double().T @ b.__getattr__(buf)["default"].double())
        assert float(cos.min()) > 1 - 1e-6, cos  # principal cosines: same subspaces
    assert torch.allclose(b.subspace_C0["default"], a.subspace_C0["default"], rtol=1e-5, atol=1e-5)
    # the randomized decomposition is seeded (a private generator): rebuilding gives the same buffers
    again = get_peft_model(_Planted(), SubspaceLoraConfig(k=5, target_modules=["lin"], exact_max_dim=0))
    assert torch.equal(again.base_model.model.lin.subspace_U["default"], b.subspace_U["default"])
    # and the function is unchanged at init either way
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(randomized(x), _Planted()(x))


@pytest.mark.parametrize("core", ["full", "diag"])
def test_residual_gradient_lives_outside_the_subspace(core):
    """C gets U^T G V and R_delta gets (I - U U^T) G (I - V V^T) of the raw weight gradient G: no double counting."""
    model = get_peft_model(Toy(), SubspaceLoraConfig(k=3, core=core, target_modules=["q"], train_residual=True))
    layer = model.base_model.model.q
    perturb_trainables(model)  # away from init, so every term contributes
    w = layer.get_base_layer().weight
    w.requires_grad_(True)  # the raw gradient of any additive (out, in) update equals W's gradient
    model.train()
    model(torch.randn(32, 8)).pow(2).mean().backward()
    g_raw = w.grad.double()
    g_r = layer.subspace_R_delta["default"].grad.double()
    g_c = layer.subspace_C["default"].grad.double()
    u, v = layer.subspace_U["default"].double(), layer.subspace_V["default"].double()
    scale = float(g_r.norm())
    assert scale > 1e-4
    assert float((u.T @ g_r).norm()) <= 1e-6 * scale and float((g_r @ v).norm()) <= 1e-6 * scale
    eye_u, eye_v = torch.eye(u.shape[0], dtype=torch.float64), torch.eye(v.shape[0], dtype=torch.float64)
    assert torch.allclose(g_r, (eye_u - u @ u.T) @ g_raw @ (eye_v - v @ v.T), atol=1e-6)
    expected_c = u.T @ g_raw @ v
    assert torch.allclose(g_c, torch.diagonal(expected_c) if core == "diag" else expected_c, atol=1e-6)


# ------------------------------------------------------------------ save / load / merge / disable / adapters
def _flip_first_direction(layer, adapter="default"):
    """U[:, 0] -> -U[:, 0] and V[:, 0] -> -V[:, 0]: another valid SVD, which a recomputation would not produce."""
    with torch.no_grad():
        layer.subspace_U[adapter][:, 0].neg_()
        layer.subspace_V[adapter][:, 0].neg_()


@pytest.mark.parametrize("core,train_residual", [("full", False), ("diag", False), ("full", True)])
def test_load_uses_the_saved_decomposition_not_a_fresh_svd(tmp_path, core, train_residual):
    """(Save/load, merge, unload and disable_adapter are in tests/test_tuner_contract.py.) A saved adapter brings its
    own U, V, C0: the loaded layer uses them, not the SVD it computes (or, with low_cpu_mem_usage, skips) on creation."""
    toy = Toy()
    base_copy = copy.deepcopy(toy)
    model = get_peft_model(toy, SubspaceLoraConfig(k=3, core=core, train_residual=train_residual,
                                                   target_modules=["q", "k", "out"]))
    _flip_first_direction(model.base_model.model.q)
    perturb_trainables(model)
    model.eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path / "adapter")
    saved_u = model.base_model.model.q.subspace_U["default"].clone()
    for low_cpu in (False, True):
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base_copy), tmp_path / "adapter",
                                             low_cpu_mem_usage=low_cpu).eval()
        # the checkpoint's U, V, C0 are used, not a fresh SVD (which would not have the flipped sign)
        assert torch.equal(reloaded.base_model.model.q.subspace_U["default"], saved_u)
        with torch.no_grad():
            assert torch.allclose(reloaded(x), y, atol=1e-6)


def test_an_adapter_created_without_the_weights_refuses_to_run_or_save_until_a_checkpoint_fills_it(tmp_path):
    """The initialised flag every peft-ext tuner shares: SubspaceLoRA is initialised by its SVD in get_peft_model, but
    one created on the meta device (low_cpu_mem_usage) holds zero placeholders until a checkpoint is loaded."""
    toy = Toy()
    cfg = SubspaceLoraConfig(k=3, target_modules=["q"])
    model = get_peft_model(copy.deepcopy(toy), cfg)
    assert model.base_model.model.q.is_initialized("default")
    model.save_pretrained(tmp_path / "adapter")
    empty = get_peft_model(copy.deepcopy(toy), cfg, low_cpu_mem_usage=True)
    layer = empty.base_model.model.q
    assert not layer.is_initialized("default")
    with pytest.raises(RuntimeError, match=r"^SubspaceLoRA adapter 'default' has no SVD yet \(it was created without "
                                           r"the base weights, e\.g\. with low_cpu_mem_usage=True\): call "
                                           r"peft\.get_peft_model"):
        empty(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"SubspaceLoRA adapter 'default' was never initialised \(1 layer\(s\).*"
                                         r"zero placeholders"):
        empty.save_pretrained(tmp_path / "empty")
    empty.load_adapter(tmp_path / "adapter", adapter_name="default", low_cpu_mem_usage=True)  # fills the meta C
    assert layer.is_initialized("default")
    assert torch.equal(layer.subspace_U["default"], model.base_model.model.q.subspace_U["default"])
    with torch.no_grad():
        x = torch.randn(2, 8)
        assert torch.allclose(empty(x), toy(x), atol=1e-6)

def test_half_precision_base_keeps_the_adapter_in_float32(tmp_path):
    """C - C0 is small next to C: PEFT's usual cast of adapters to the base dtype (autocast_adapter_dtype=False, or
    a low_cpu_mem_usage load) would round C to bfloat16 and swamp the trained change. The adapter stays float32."""
    base = Toy().to(torch.bfloat16)
    model = get_peft_model(copy.deepcopy(base), SubspaceLoraConfig(k=3, target_modules=["q", "k"]),
                           autocast_adapter_dtype=False)
    layer = model.base_model.model.q
    assert {layer.subspace_C["default"].dtype, layer.subspace_U["default"].dtype} == {torch.float32}
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    perturb_trainables(model, scale=1e-3)
    delta = layer.get_delta_weight("default").detach()
    model.save_pretrained(tmp_path / "ad")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad", low_cpu_mem_usage=True)
    again = reloaded.base_model.model.q
    assert again.subspace_C["default"].dtype == torch.float32
    assert torch.allclose(again.get_delta_weight("default"), delta, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_two_adapters_and_set_adapter():
    model = get_peft_model(Toy(), SubspaceLoraConfig(k=3, target_modules=["q"]), adapter_name="first")
    model.add_adapter("second", SubspaceLoraConfig(k=2, core="diag", target_modules=["q", "k"], train_residual=True))
    layer = model.base_model.model.q
    assert layer.subspace_C["first"].shape == (3, 3) and layer.subspace_C["second"].shape == (2,)
    assert _trainable(model) == {"base_model.model.q.subspace_C.first"}
    model.set_adapter("second")
    assert _trainable(model) == {f"base_model.model.{m}.{n}.second" for m in ("q", "k")
                                 for n in ("subspace_C", "subspace_R_delta")}
    perturb_trainables(model, seed=1)
    model.set_adapter("first")
    perturb_trainables(model, seed=2)
    model.eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        ya = model(x)
        model.set_adapter("second")
        yb = model(x)
    assert not torch.allclose(ya, yb)


# ------------------------------------------------------------------ export to plain LoRA
def test_export_to_lora_loads_in_vanilla_peft_with_identical_outputs(tmp_path):
    from transformers import BertForSequenceClassification

    save_tiny_bert_classifier(tmp_path / "base")
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(tmp_path / "base"),
        SubspaceLoraConfig(k=4, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
                           task_type="SEQ_CLS"),
    )
    perturb_trainables(model)
    model.eval()
    batch = token_batches(n_batches=1, seed=5)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_to_lora(model, tmp_path / "lora")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "peft_ext_export.json"]
    maxdiff, cfg = outputs_under_vanilla_peft(tmp_path, tmp_path / "base", tmp_path / "lora", batch, expected)
    assert cfg["peft_type"] == "LORA"
    assert maxdiff < 1e-5
    assert cfg["r"] == 4 and float(cfg["lora_alpha"]) == 4.0  # rank k, scaling 1


def test_export_is_refused_with_a_trained_residual(tmp_path):
    model = get_peft_model(Toy(), SubspaceLoraConfig(k=3, target_modules=["q"], train_residual=True))
    with pytest.raises(ValueError, match=r"train_residual=True.*merge_and_unload"):
        export_to_lora(model, tmp_path / "lora")
    assert not os.path.exists(tmp_path / "lora") and not os.listdir(tmp_path)


@pytest.mark.parametrize("core", ["full", "diag"])
def test_gpt2_conv1d_layers(tmp_path, core):
    """GPT-2 stores weights as (in, out) in Conv1D: the SVD, the merge and the export must transpose correctly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval().save_pretrained(
        tmp_path / "base")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(),
                           SubspaceLoraConfig(k=4, core=core, target_modules=["c_attn", "c_proj"]))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.in_features == 32 and layer.out_features == 96
    u_ref, _, v_ref = _reference_top_k(layer.get_base_layer().weight.T, 4)  # (out, in) = weight.T
    assert layer.subspace_U["default"].shape == (96, 4)
    assert torch.allclose(_projector(layer.subspace_U["default"]), _projector(u_ref), atol=1e-5)
    assert torch.allclose(_projector(layer.subspace_V["default"]), _projector(v_ref), atol=1e-5)
    x = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        with model.disable_adapter():
            y0 = model(**x).logits
        assert torch.allclose(model(**x).logits, y0, atol=1e-6)
    perturb_trainables(model)
    with torch.no_grad():
        y = model(**x).logits
    assert not torch.allclose(y, y0, atol=1e-3)
    export_to_lora(model, tmp_path / "lora")
    as_lora = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(as_lora(**x).logits, y, atol=1e-5)


# ------------------------------------------------------------------ bitsandbytes NF4 base
def test_nf4_base_is_never_touched_and_round_trips(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BertModel, BitsAndBytesConfig

    tiny_bert(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")  # in % 64 == 0, as real models

    def load():
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return BertModel.from_pretrained(tmp_path / "base", quantization_config=q, device_map="cpu").eval()

    model = get_peft_model(load(), SubspaceLoraConfig(k=4, target_modules=["query", "value"]))
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    packed = layer.get_base_layer().weight.data.clone()
    # the SVD is of the dequantised weight
    u_ref, s_ref, _ = _reference_top_k(layer.get_base_weight(), 4)
    assert torch.allclose(_projector(layer.subspace_U["default"]), _projector(u_ref), atol=1e-5)
    assert torch.allclose(torch.diagonal(layer.subspace_C0["default"]).double(), s_ref, rtol=1e-5)
    batch = token_batches(n_batches=1, seed=3)[0]
    with torch.no_grad():
        with model.disable_adapter():
            y_base = model(**batch).last_hidden_state
        assert torch.allclose(model(**batch).last_hidden_state, y_base, atol=1e-5)

    model.train()
    c_before = layer.subspace_C["default"].detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**batch).last_hidden_state.pow(2).mean().backward()
    opt.step()
    model.eval()
    assert not torch.equal(layer.subspace_C["default"], c_before)
    assert torch.equal(layer.get_base_layer().weight.data, packed)  # W untouched
    perturb_trainables(model, scale=0.5)
    with torch.no_grad():
        y = model(**batch).last_hidden_state
    assert not torch.allclose(y, y_base, atol=1e-4)
    model.save_pretrained(tmp_path / "ad")
    export_to_lora(model, tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(load(), tmp_path / "ad").eval()
    as_lora = PeftModel.from_pretrained(load(), tmp_path / "lora").eval()
    disable_bnb_cpu_repack(as_lora)  # vanilla PEFT: keep bitsandbytes in float32 on every CPU, as our layers do
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).last_hidden_state, y, atol=1e-5)
        assert torch.allclose(as_lora(**batch).last_hidden_state, y, atol=1e-4)


# ------------------------------------------------------------------ bad inputs: clear error, model unchanged
def test_config_errors_name_field_and_value():
    with pytest.raises(ValueError, match=r"k must be a positive integer, got k=0"):
        SubspaceLoraConfig(k=0, target_modules=["q"])
    with pytest.raises(ValueError, match=r"k must be a positive integer, got k=True"):
        SubspaceLoraConfig(k=True, target_modules=["q"])
    with pytest.raises(ValueError, match=r"core must be one of \('full', 'diag'\), got core='x'"):
        SubspaceLoraConfig(k=2, core="x", target_modules=["q"])
    with pytest.raises(ValueError, match="target_modules is required"):
        SubspaceLoraConfig(k=2)
    with pytest.raises(ValueError, match=r"exact_max_dim must be an integer >= 0, got exact_max_dim=-1"):
        SubspaceLoraConfig(k=2, target_modules=["q"], exact_max_dim=-1)
    with pytest.raises(ValueError, match=r"train_residual must be True or False"):
        SubspaceLoraConfig(k=2, target_modules=["q"], train_residual="yes")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("k", "8", r"k must be a positive integer, got k='8' \(str\)"),
        ("core", None, r"core must be one of \('full', 'diag'\), got core=None"),
        ("niter", 4.0, r"niter must be an integer >= 0, got niter=4\.0"),
        ("seed", None, r"seed must be an integer, got seed=None"),
        ("target_modules", 5, r"target_modules must be a list of module names or one regex string, got target_modules=5"),
        ("exclude_modules", [None], r"exclude_modules must be a list .*got exclude_modules=\[None\] \(list\)"),
        ("modules_to_save", "classifier", r"modules_to_save must be a list of module names, got "
                                          r"modules_to_save='classifier' \(str\); e\.g\. \['classifier'\]"),
        ("layers_to_transform", [0.5], r"layers_to_transform must be a layer index >= 0 or a list of them"),
        ("layers_pattern", ["h", 1], r"layers_pattern must be the name of the layer list"),
        ("inference_mode", None, r"inference_mode must be True or False, got inference_mode=None"),
        ("revision", 3, r"revision must be a string or None, got revision=3"),
    ],
)
def test_every_config_field_is_type_checked_by_name(field, value, message):
    kwargs = dict(k=2, target_modules=["q"])
    kwargs[field] = value
    with pytest.raises(ValueError, match=r"SubspaceLoraConfig\." + message):
        SubspaceLoraConfig(**kwargs)


def test_k_larger_than_a_target_is_refused_before_any_change():
    toy = Toy()
    before = state_of(toy)
    with pytest.raises(ValueError, match=r"k=9 is larger than min\(out, in\).*q \(weight shape \(out, in\) = \(12, 8\)\)"):
        get_peft_model(toy, SubspaceLoraConfig(k=9, target_modules=["q", "k"]))
    assert isinstance(toy.q, nn.Linear) and same_state(state_of(toy), before)
    # 'all-linear' is expanded before the check: `out` (4 x 12) cannot take k=5
    with pytest.raises(ValueError, match=r"k=5 .*out \(weight shape \(out, in\) = \(4, 12\)\)"):
        get_peft_model(toy, SubspaceLoraConfig(k=5, target_modules="all-linear"))
    assert type(toy.q) is nn.Linear and same_state(state_of(toy), before)


def test_add_adapter_with_too_large_k_leaves_the_model_unchanged():
    model = get_peft_model(Toy(), SubspaceLoraConfig(k=2, target_modules=["q", "out"]))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"k=5 is larger than min\(out, in\).*out \(weight shape"):
        model.add_adapter("second", SubspaceLoraConfig(k=5, target_modules=["q", "out"]))
    assert same_state(state_of(model), before)
    assert "second" not in model.peft_config and "second" not in model.base_model.model.q.subspace_C


def test_target_modules_matching_nothing_or_unsupported():
    toy = Toy()
    with pytest.raises(ValueError, match="nope"):
        get_peft_model(toy, SubspaceLoraConfig(k=2, target_modules=["nope"]))
    assert type(toy.q) is nn.Linear
    bert = tiny_bert()
    before = state_of(bert)
    with pytest.raises(TypeError, match=r"cannot adapt 1 target module\(s\): '.*word_embeddings'.*not Embedding"):
        get_peft_model(bert, SubspaceLoraConfig(k=2, target_modules=["query", "word_embeddings"]))
    assert not any(isinstance(m, SubspaceLoraLayer) for m in bert.modules()) and same_state(state_of(bert), before)


# ------------------------------------------------------------------ trainer_ext integration
def test_directional_optimizer_puts_the_core_in_the_magnitude_group():
    from trainer_ext import create_directional_optimizer

    model = get_peft_model(Toy(), SubspaceLoraConfig(k=3, target_modules=["q", "k"], train_residual=True))
    opt = create_directional_optimizer(model, lr=1e-3, weight_decay=0.1, magnitude_lr_ratio=5.0)
    roles = {n: opt.role_of[p] for n, p in model.named_parameters() if p.requires_grad}
    assert roles == {**{f"base_model.model.{m}.subspace_C.default": "magnitude" for m in ("q", "k")},
                     **{f"base_model.model.{m}.subspace_R_delta.default": "default" for m in ("q", "k")}}
    groups = {g.role: g for g in opt.describe()}
    assert groups["magnitude"].n_params == 2 * 3 * 3
    assert groups["magnitude"].lr == pytest.approx(5e-3) and groups["magnitude"].weight_decay == 0.0
    assert groups["default"].n_params == 2 * 12 * 8 and groups["default"].weight_decay == 0.1
