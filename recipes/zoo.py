"""Small models for the recipes, written here because timm does not import with the CPU torch on our machines.

`ViT` uses timm's module names (`patch_embed.proj`, `blocks.{i}.attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `norm`,
`head`), so every target pattern, alias and adapter config written for timm's ViT-S applies to it unchanged.
Its forward takes `pixel_values` (and optional `labels`) and returns a dict with `logits` (and `loss`), which is
all `transformers.Trainer` needs from a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be a multiple of patch={patch}; e.g. image_size={patch * 4}")
        self.num_patches = (image_size // patch) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """A pre-norm ViT (class token, learned position embeddings), timm-initialised (truncated normal, std 0.02)."""

    def __init__(self, image_size: int = 16, patch: int = 4, in_chans: int = 1, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, num_classes: int = 10, seed: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.arch = dict(image_size=image_size, patch=patch, in_chans=in_chans, dim=dim, depth=depth, heads=heads,
                           mlp_ratio=mlp_ratio, num_classes=num_classes)
        self.patch_embed = PatchEmbed(image_size, patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.nn.init.trunc_normal_(torch.empty_like(m.weight), std=0.02, generator=gen))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.pos_embed.copy_(torch.nn.init.trunc_normal_(torch.empty_like(self.pos_embed), std=0.02, generator=gen))
        self.cls_token.zero_()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)[:, 0])
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def linear_targets(model: nn.Module, patterns=TARGETS) -> dict[str, nn.Linear]:
    """name -> nn.Linear for the target aliases (timm and transformers names alike, see trainer_ext.targets)."""
    from trainer_ext.targets import pattern_regex

    regexes = [pattern_regex(p) for p in patterns]
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(r.search(n) for r in regexes)}


def random_orthonormal(rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))[0].float()


@torch.no_grad()
def plant_low_rank(model: nn.Module, rank: int, strength: float, generator: torch.Generator,
                   patterns=TARGETS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Add a rank-`rank` matrix U diag(s) V^T in random subspaces to every target weight of `model`, in place, with
    s from `strength * sigma_max(W)` down to half of it; returns the planted (U, V) per module name.

    A student starting from the unplanted weights must learn exactly these deltas: the subspace it needs is known,
    so a method that claims to find "the right directions" can be checked against it."""
    planted = {}
    for name, lin in linear_targets(model, patterns).items():
        w = lin.weight
        u = random_orthonormal(w.shape[0], rank, generator)
        v = random_orthonormal(w.shape[1], rank, generator)
        s = strength * float(torch.linalg.matrix_norm(w, ord=2)) * torch.linspace(1.0, 0.5, rank)
        w.add_(u @ torch.diag(s) @ v.T)
        planted[name] = (u, v)
    return planted


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / k for orthonormal A (n, k) and B (n, k'): 1 when span(B) contains span(A), about k'/n for
    unrelated random subspaces."""
    return float((a.T.double() @ b.double()).pow(2).sum()) / a.shape[1]


def frozen_orthonormal_a(model, seed: int) -> None:
    """LoRA-FA: every lora_A a random orthonormal basis (rows), frozen (B stays 0, trained)."""
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            w = mod.lora_A["default"].weight
            q, _ = torch.linalg.qr(torch.randn(w.shape[1], w.shape[0], generator=g))
            with torch.no_grad():
                w.copy_(q.T.to(w.dtype))
            w.requires_grad_(False)
