import json

import pytest
import torch
from safetensors import safe_open

from peft_ext import ActivationStats, StatsRecorder
from peft_ext.stats import canonical_name

from .conftest import Toy, tiny_bert, token_batches


def _direct_cov(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(rows).to(torch.float64)
    return x.T @ x / x.shape[0]


def test_covariance_matches_direct_computation_for_any_batch_size():
    toy = Toy()
    data = torch.randn(23, 8)
    expected = _direct_cov([data])
    for bs in (1, 5, 23):
        batches = [data[i : i + bs] for i in range(0, 23, bs)]
        stats = ActivationStats.collect(toy, batches, ["q", "k"], progress=False)
        assert stats.token_count("q") == 23
        assert torch.allclose(stats.covariance("q"), expected, rtol=1e-12, atol=1e-14)
        assert stats.covariance("q").dtype == torch.float64


def test_shared_input_is_computed_once():
    toy = Toy()
    stats = ActivationStats.collect(toy, [torch.randn(4, 8)], ["q", "k", "out"], progress=False)
    assert stats.aliases == {"k": "q"}  # k reads the very tensor q read
    assert set(stats.sums) == {"q", "out"}
    assert stats.layers == ["q", "out", "k"]
    assert torch.equal(stats.covariance("k"), stats.covariance("q"))
    unshared = ActivationStats.collect(toy, [torch.randn(4, 8)], ["q", "k"], share_inputs=False, progress=False)
    assert set(unshared.sums) == {"q", "k"}


def test_padding_is_excluded_with_the_attention_mask():
    model = tiny_bert()
    batches = token_batches(n_batches=2, batch=3, seq=10, pad_last=4)
    stats = ActivationStats.collect(model, batches, ["query", "key", "value", "dense"], progress=False)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats.token_count("encoder.layer.0.attention.self.query") == n_real
    # q/k/v of each layer share one covariance
    assert stats.owner("encoder.layer.1.attention.self.value") == "encoder.layer.1.attention.self.query"
    # the pooler reads a 2-D [batch, hidden] input: one row per sequence, no mask involved
    assert stats.token_count("pooler.dense") == 6
    # direct computation of the query input of layer 0 over real tokens only
    rows = []
    hook_rows = []
    h = model.encoder.layer[0].attention.self.query.register_forward_pre_hook(lambda m, a: hook_rows.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
            rows.append(hook_rows[-1][b["attention_mask"].bool()])
    h.remove()
    assert torch.allclose(stats.covariance("encoder.layer.0.attention.self.query"), _direct_cov(rows), rtol=1e-10)


def test_nan_input_names_the_layer_and_the_batch():
    toy = Toy()
    bad = torch.randn(4, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'q' in calibration batch 1"):
        ActivationStats.collect(toy, [torch.randn(4, 8), bad], ["q"], progress=False)


def test_save_load_round_trip_with_metadata(tmp_path):
    model = tiny_bert()
    stats = ActivationStats.collect(model, token_batches(), ["query", "key", "value"], progress=False)
    path = tmp_path / "sub" / "stats.safetensors"
    stats.save(path, metadata={"data": "unit-test"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.safetensors"]  # no temp file left
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["format"] == "peft_ext.activation_stats"
    assert json.loads(header["metadata"])["data"] == "unit-test"
    loaded = ActivationStats.load(path)
    assert loaded.layers == stats.layers and loaded.aliases == stats.aliases and loaded.tokens == stats.tokens
    for name in stats.layers:
        assert torch.equal(loaded.covariance(name), stats.covariance(name))


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a peft_ext activation statistics file"):
        ActivationStats.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        ActivationStats.load(tmp_path / "missing.safetensors")


def test_float32_accumulation_option():
    toy = Toy()
    data = torch.randn(16, 8)
    stats = ActivationStats.collect(toy, [data], ["q"], dtype=torch.float32, progress=False)
    assert stats.covariance("q").dtype == torch.float32
    assert torch.allclose(stats.covariance("q").double(), _direct_cov([data]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dtype must be"):
        ActivationStats.collect(toy, [data], ["q"], dtype=torch.float16, progress=False)


def test_unknown_targets_and_unreached_layers():
    toy = Toy()
    with pytest.raises(ValueError, match="matched no layer"):
        ActivationStats.collect(toy, [torch.randn(2, 8)], ["nope"], progress=False)
    stats = ActivationStats.collect(toy, [torch.randn(2, 8)], ["q", "unused"], progress=False)
    assert "unused" not in stats  # never reached: no entry, and reading it says so
    with pytest.raises(KeyError, match="no statistics for layer 'unused'"):
        stats.covariance("unused")


def test_recorder_streams_user_forward_passes_and_peft_names():
    from peft import get_peft_model

    import peft_ext

    model = get_peft_model(Toy(), peft_ext.NullSpaceLoraConfig(r=2, target_modules=["q", "k"])).eval()
    data = torch.randn(5, 8)
    with StatsRecorder(model, None) as rec:  # None: the PEFT tuner layers
        with rec.batch():
            model(data)
        model(data)  # outside a batch scope: not recorded
    stats = rec.result()
    assert stats.layers == ["q", "k"]  # canonical names, no base_model.model. prefix
    assert stats.token_count("q") == 5
    assert canonical_name("base_model.model.enc.q.base_layer") == "enc.q"
    assert canonical_name("module.base_model.model.enc.q") == "enc.q"  # DDP around a PeftModel
    assert canonical_name("_orig_mod.module.enc.q") == "enc.q"


def test_collection_restores_each_modules_own_mode():
    from peft import get_peft_model

    import peft_ext

    model = get_peft_model(tiny_bert(), peft_ext.NullSpaceLoraConfig(r=2, target_modules=["query"]))
    assert model.training and not model.base_model.model.encoder.training  # PeftModel wrapper vs eval model inside
    modes = {n: m.training for n, m in model.named_modules()}
    ActivationStats.collect(model, token_batches(n_batches=1), ["query"], progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
