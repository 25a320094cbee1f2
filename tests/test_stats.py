import json
import os
import re
import stat
import time

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


# ------------------------------------------------------------------ a stats file that is wrong: one line, naming it (issue 13)
def _saved_stats(tmp_path):
    stats = ActivationStats.collect(Toy(), [torch.randn(6, 8), torch.randn(5, 8)], ["q", "k", "out"], progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    return path


def _rewrite(path, edit_tensors=None, **header):
    """Rewrite a stats file with its tensors passed through `edit_tensors` and header fields replaced (None: dropped)."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    meta.update(header)
    save_file(tensors, path, metadata={k: v for k, v in meta.items() if v is not None})


@pytest.mark.parametrize(
    "edit, header, message",
    [
        (None, {"format_version": "999"},
         r"has format_version='999', but this peft_ext reads format_version '1' or '2': recollect"),
        (None, {"format_version": None}, r"has format_version=None, but this peft_ext reads format_version '1' or '2'"),
        (None, {"tokens": json.dumps({"out": 11})}, r"the token table has no entry for layer 'q' \(it has 1 entries"),
        (None, {"tokens": json.dumps({"q": -11, "out": 11})}, r"the token count of layer 'q' is -11; a count is an integer >= 0"),
        (None, {"tokens": json.dumps({"q": 11.5, "out": 11})}, r"the token count of layer 'q' is 11\.5"),
        (None, {"tokens": "{q: 11"}, r"header field 'tokens' is not valid JSON"),
        (None, {"order": None}, r"has no 'order' field in its header"),
        (None, {"aliases": "[]"}, r"header field 'aliases' holds a list, not a JSON object"),
        (lambda t: t.pop("sum::out"), {}, r"lists layer 'out' in its header but holds no tensor 'sum::out'"),
        (lambda t: t.update({"sum::q": t["sum::q"].to(torch.int64)}), {},
         r"the sum for layer 'q' has dtype torch\.int64; statistics are float32 or float64"),
        (lambda t: t.update({"sum::q": t["sum::q"][:5].contiguous()}), {},
         r"the sum for layer 'q' has shape \(5,\), neither the \(d, d\) of a sum of x x\^T nor its packed form"),
        (lambda t: t.update({"sum::q": torch.zeros(8, 8, dtype=t["sum::q"].dtype)}), {},
         r"layer 'q' has a tensor of shape \(8, 8\), but format_version 2 stores packed 1-D sums"),
        (lambda t: t["sum::out"].__setitem__(1, float("inf")), {},
         r"the sum for layer 'out' holds 1 non-finite \(NaN/Inf\) value\(s\) of 144"),
        # below 128 the packed sum is one tile, the whole matrix row-major: (3, 3) of 8 x 8 sits at 3 * 8 + 3 = 27
        (lambda t: t["sum::q"].__setitem__(27, -1.0), {}, r"the sum for layer 'q' has a negative diagonal entry"),
        (None, {"block_size": "64"}, r"stores its sums in tiles of block_size='64', this peft_ext in tiles of 128"),
        (None, {"aliases": json.dumps({"k": "nope"})}, r"alias 'k' points at 'nope', which has no statistics"),
    ],
    ids=["version", "no-version", "token-missing", "token-negative", "token-float", "tokens-json", "no-order",
         "aliases-type", "tensor-missing", "dtype", "shape", "full-in-v2", "inf", "negative-diagonal", "block-size",
         "alias"],
)
def test_load_names_the_file_and_what_is_wrong(tmp_path, edit, header, message):
    path = _saved_stats(tmp_path)
    _rewrite(path, edit, **header)
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r".*" + message) as err:
        ActivationStats.load(path)
    assert "\n" not in str(err.value)


def test_truncated_or_non_safetensors_files_are_named(tmp_path):
    path = _saved_stats(tmp_path)
    data = path.read_bytes()
    for cut in (len(data) - 64, 40, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r" is not a readable safetensors file .*it "
                                             r"is truncated or corrupt; recollect"):
            ActivationStats.load(path)


def test_stats_files_get_the_umask_permissions_and_no_temporary_survives(tmp_path):
    path = _saved_stats(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # mkstemp's 0o600 made them private
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import peft_ext.stats as stats_module

    path = _saved_stats(tmp_path)
    old = path.read_bytes()

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(stats_module, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        ActivationStats.load(path).save(path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


def test_the_next_save_removes_temporaries_of_interrupted_saves(tmp_path):
    import subprocess
    import sys

    from peft_ext.files import _HOST

    path = _saved_stats(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited: its temporary is nobody's work in progress
    killed = tmp_path / f".stats.safetensors.tmp-{dead_pid}-{_HOST}-abcd1234"
    killed.write_bytes(b"half")
    old_style = tmp_path / ".stats-k2j4h5g6.safetensors"  # what the writer's mkstemp named them before
    old_style.write_bytes(b"half")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_style, (day_ago, day_ago))
    recent_old_style = tmp_path / ".stats-zzzzzzzz.safetensors"  # may be a live older-version writer: kept a day
    recent_old_style.write_bytes(b"half")
    ActivationStats.load(path).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stats-zzzzzzzz.safetensors", "stats.safetensors"]


def test_fingerprint_is_the_same_through_a_modules_to_save_wrapper():
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    import peft_ext
    from peft_ext.stats import model_fingerprint

    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=48)).eval()
    before = model_fingerprint(plain)
    wrapped = get_peft_model(plain, peft_ext.NullSpaceLoraConfig(r=2, target_modules=["query"],
                                                                 modules_to_save=["classifier"]))
    assert model_fingerprint(wrapped) == before  # the head's original counts under its own name


def test_collected_statistics_record_the_model_and_the_check_names_what_differs():
    model = tiny_bert()
    stats = ActivationStats.collect(model, token_batches(n_batches=1), ["query"], progress=False)
    assert stats.model_check(model) == (True, "same config and weights")
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] += 1.0
    same, why = stats.model_check(model)
    assert not same and why == "1 of 41 weight tensors differ, e.g. ['encoder.layer.1.output.dense.weight']"
    assert stats.model_check(model, ignore_modules=["dense"])[0] is True


def test_fingerprint_of_a_tensor_above_float32_exact_integers():
    """Sampled positions of a > 2**24-entry tensor stay in range (a float32 linspace rounded the last one past it)."""
    from torch import nn

    from peft_ext.stats import model_fingerprint

    big = nn.Embedding(49152, 576)  # SmolLM2's embedding: 28,311,552 entries
    a = model_fingerprint(big)
    with torch.no_grad():
        big.weight[-1, -1] += 1.0  # the last entry is among the sampled ones
    assert model_fingerprint(big) != a


# ------------------------------------------------------------------ packed symmetric storage (issue 14, section 3)
@pytest.mark.parametrize("n", [1, 5, 128, 129, 300])
def test_pack_unpack_round_trip_diagonal_positions_and_gram_update(n):
    from peft_ext.stats import (BLOCK, add_gram_, pack_symmetric, packed_diagonal_index, packed_dim, packed_length,
                                unpack_symmetric)

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n + 3, n, dtype=torch.float64, generator=g)
    m = x.T @ x
    m = (m + m.T) / 2
    p = pack_symmetric(m)
    edges = list(range(0, n, BLOCK)) + [n]
    sizes = [b - a for a, b in zip(edges, edges[1:])]
    assert p.shape == (packed_length(n),) == ((n * n + sum(b * b for b in sizes)) // 2,)
    assert p.numel() <= n * (n + BLOCK) / 2 and packed_dim(p.numel()) == n
    assert torch.equal(p[: min(n, BLOCK)], m[0, : min(n, BLOCK)])  # first tile, first row
    assert torch.equal(unpack_symmetric(p), m)
    assert torch.equal(p[packed_diagonal_index(n)], m.diagonal())
    # the blocked update computes only the tiles on and above the diagonal, and equals the full product's
    acc = torch.zeros(packed_length(n), dtype=torch.float64)
    add_gram_(add_gram_(acc, x[:2]), x[2:])
    torch.testing.assert_close(unpack_symmetric(acc), x.T @ x, rtol=1e-12, atol=1e-12)


def test_packed_dim_and_unpack_refuse_lengths_no_size_has():
    from peft_ext.stats import packed_dim, unpack_symmetric

    assert [packed_dim(k) for k in (1, 4, 9, 25, 16513)] == [1, 2, 3, 5, 129]  # below 128: one tile, n^2
    assert packed_dim(5) is None and packed_dim(0) is None
    with pytest.raises(ValueError, match=r"1-D with packed_length\(n\) entries, got shape \(5,\)"):
        unpack_symmetric(torch.zeros(5))


def test_collected_sums_are_packed_and_equal_the_full_sum():
    """The stored sum is the packed upper triangle of sum x x^T (half the memory), and every reader gives the full one."""
    torch.manual_seed(0)
    batches = [torch.randn(6, 8), torch.randn(5, 8)]
    stats = ActivationStats.collect(Toy(), batches, ["q", "k", "out"], progress=False)
    xs = []
    model = Toy()
    h = model.q.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    x = torch.cat(xs)
    want = x.T @ x
    stored = stats._sums["q"]
    assert stored.dim() == 1 and stored.numel() == 8 * 8  # one tile below 128
    torch.testing.assert_close(stats.covariance("q"), want / x.shape[0], rtol=1e-12, atol=1e-12)
    assert stats._sums["q"].dim() == 1  # covariance() did not keep a full copy
    assert stats.trace("q") == pytest.approx(float(want.trace()), rel=1e-12)
    assert stats.dim("k") == 8 and stats.sums["q"].shape == (8, 8)  # reading through .sums gives (d, d)


def test_version_1_files_with_full_matrices_still_load(tmp_path):
    from safetensors.torch import save_file

    stats = ActivationStats.collect(Toy(), [torch.randn(6, 8), torch.randn(5, 8)], ["q", "k", "out"], progress=False)
    path = tmp_path / "old.safetensors"
    stats.save(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    full = {f"sum::{n}": stats.sums[n].contiguous() for n in stats.sums}
    save_file(full, path, metadata={**meta, "format_version": "1"})
    old = ActivationStats.load(path)
    for n in ("q", "k", "out"):
        torch.testing.assert_close(old.covariance(n), stats.covariance(n), rtol=0, atol=0)
