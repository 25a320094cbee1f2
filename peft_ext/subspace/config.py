from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .._config_fields import check_bool, check_shared_fields, shown
from .._tuners import TargetFields, validate_target_fields
from ..registry import ensure_peft_type

CORES = ("full", "diag")


@dataclass
class SubspaceLoraConfig(PeftConfig, TargetFields):
    """Configuration of a SubspaceLoRA adapter: fine-tune inside each weight's own top-k singular subspace.

    Per target matrix a top-k truncated SVD gives ``W = R + U C0 V^T`` with ``R = W - U C0 V^T``. U (out, k) and
    V (in, k) are frozen, the core C (k x k, or its diagonal) is trained from C0, so the layer computes
    ``W x + U (C - C0) V^T x``: the function is unchanged at init and W itself is never rewritten (quantised bases
    work, the export to LoRA is exact at rank k).

    With ``train_residual=True`` the residual R is trained too, as a dense ``R_delta`` (out, in) from 0 whose
    effect is confined to the orthogonal complement of span(U) x span(V), so C and R never double-count a
    direction. That makes the adapter as large as the layer, and the export to a low-rank LoRA impossible
    (use ``merge_and_unload`` instead).
    """

    k: int = field(default=8, metadata={"help": "Rank: number of top singular directions per layer (1 <= k <= min(out, in))."})
    core: Literal["full", "diag"] = field(
        default="full",
        metadata={"help": "'full': train a k x k core C (U C V^T may rotate within the subspaces); "
                  "'diag': train only the k singular values (the singular vectors stay fixed)."},
    )
    train_residual: bool = field(
        default=False,
        metadata={"help": "Also train the residual R = W - U C0 V^T, restricted to the orthogonal complement of the "
                  "subspaces (a dense (out, in) R_delta per layer: the adapter becomes as large as the layer, and "
                  "export_to_lora is refused)."},
    )
    exact_max_dim: int = field(
        default=512,
        metadata={"help": "Exact SVD (torch.linalg.svd) for a weight with min(out, in) <= exact_max_dim, a "
                  "randomized top-k SVD above (0: always randomized)."},
    )
    niter: int = field(
        default=4,
        metadata={"help": "Power iterations of the randomized SVD (more: top-k subspaces closer to exact)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD's Gaussian test vectors (a private generator)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("subspace_lora")
        if not _is_int(self.k) or self.k < 1:
            raise ValueError(f"SubspaceLoraConfig.k must be a positive integer, got k={shown(self.k)}; use e.g. k=8")
        if self.core not in CORES:
            raise ValueError(f"SubspaceLoraConfig.core must be one of {CORES}, got core={shown(self.core)}")
        check_bool(self, "SubspaceLoraConfig", "train_residual")
        if not _is_int(self.exact_max_dim) or self.exact_max_dim < 0:
            raise ValueError(
                f"SubspaceLoraConfig.exact_max_dim must be an integer >= 0, got exact_max_dim={shown(self.exact_max_dim)}; "
                "use 0 to always use the randomized SVD"
            )
        if not _is_int(self.niter) or self.niter < 0:
            raise ValueError(
                f"SubspaceLoraConfig.niter must be an integer >= 0, got niter={shown(self.niter)}; the default is 4"
            )
        if not _is_int(self.seed):
            raise ValueError(f"SubspaceLoraConfig.seed must be an integer, got seed={shown(self.seed)}; e.g. seed=0")
        check_shared_fields(self, "SubspaceLoraConfig")
        validate_target_fields(self, "SubspaceLoraConfig")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
