"""The options of a LoRA-X conversion (`peft_ext.lorax.convert(..., **options)`, `peft-ext lorax convert --...`).

Kept apart from `peft_ext.lorax` (which imports torch) so that the command line builds its `lorax convert` options
from these fields without importing torch: `peft-ext lorax convert --help` answers in a blink. `peft_ext.lorax`
re-exports everything here.
"""

from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal, Optional, get_args

Method = Literal["lorax", "copy", "delta-sigma"]
OnLowSimilarity = Literal["keep", "drop", "copy"]
METHODS: tuple[str, ...] = get_args(Method)
ON_LOW_SIMILARITY: tuple[str, ...] = get_args(OnLowSimilarity)


@dataclass
class TransferOptions:
    """Every knob of a LoRA-X conversion (recorded as `settings` in the report).

    Each field is also a `peft-ext lorax convert` option (`--subspace-rank`, a True default as `--no-...`), with its
    help text from `metadata["help"]`; `metadata["cli"] = False` keeps a field Python-only.
    """

    method: Method = field(default="lorax", metadata={
        "help": "lorax: project the update onto the target's subspaces; copy: write the source factors unchanged "
                "(baseline); delta-sigma: put the source's singular-value shifts diag(U_s^T dW V_s) on the target's "
                "singular vectors (baseline)"})
    rank: Optional[int] = field(default=None, metadata={
        "help": "rank written per layer (default: the source rank); not together with energy"})
    energy: Optional[float] = field(default=None, metadata={
        "help": "instead of rank: the smallest rank keeping this share of ||dW_t||_F^2, in (0, 1], e.g. 0.99"})
    subspace_rank: int = field(default=64, metadata={"help": "k of the top-k SVD of each base weight (clipped)"})
    carry_complement: bool = field(default=True, metadata={
        "help": "also carry the part of the adapter outside the source's top subspace (ProLoRA-style); off: project "
                "onto the target's top subspace only (original LoRA-X)"})
    min_similarity: float = field(default=0.0, metadata={
        "help": "layers with min(phi_U, phi_V) below this get on_low_similarity; 0 = never"})
    on_low_similarity: OnLowSimilarity = field(default="keep", metadata={
        "help": "what a layer below min_similarity gets: keep (transfer it anyway, flagged in the report), drop "
                "(leave it out), copy (write the source factors unchanged)"})
    allow_shape_mismatch: bool = field(default=False, metadata={
        "help": "EXPERIMENTAL: align layers of different shapes by singular-vector index"})
    drop_modules_to_save: bool = field(default=False, metadata={
        "help": "leave out tensors that are not LoRA factors (modules_to_save, trained biases) instead of refusing"})
    force: bool = field(default=False, metadata={
        "help": "convert although the adapter's base_model_name_or_path is not the source base"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where base-weight SVDs are cached (default $HF_HOME/peft_ext/lorax_svd)"})
    cache: bool = field(default=True, metadata={"help": "read/write the SVD cache"})
    cache_max_gb: float = field(default=10.0, metadata={
        "help": "size limit of the SVD cache folder in GB: after each write the least recently used entries are "
                "removed until it fits"})
    target_name: Optional[str] = field(default=None, metadata={
        "help": "base_model_name_or_path written into the converted adapter's config (default: the target's folder "
                "or Hub id; for a target passed as a module, its name_or_path when it has one)"})
    exact_max_dim: int = field(default=512, metadata={"help": "exact SVD up to this min(out, in), randomized above"})
    # Defaults from benchmarks/lorax_svd_accuracy.py (4096^2, k=64, realistic spectrum): oversample 8 / niter 2 moved the
    # top-subspace-only transfer's energy by 13%; 64 / 4 by 0.3%, still ~30x faster than the full SVD.
    oversample: int = field(default=64, metadata={"help": "randomized SVD: extra test vectors"})
    niter: int = field(default=4, metadata={"help": "randomized SVD: power iterations"})
    seed: int = field(default=0, metadata={"help": "randomized SVD: seed of the test vectors (fresh per matrix)"})
    adapter_name: str = field(default="default", metadata={
        "help": "which adapter of a PeftModel to convert (a saved adapter folder holds one)", "cli": False})
    progress: bool = field(default=True, metadata={
        "help": "a progress bar over the layers (main process only; also off with HF_HUB_DISABLE_PROGRESS_BARS=1 "
                "or huggingface_hub.utils.disable_progress_bars())"})
    quiet: InitVar[Optional[bool]] = None  # deprecated spelling of progress=False (not a field: not in the report)

    def __post_init__(self, quiet: Optional[bool]) -> None:
        if quiet is not None:
            warnings.warn("TransferOptions(quiet=...) is deprecated and will be removed; use progress=False (quiet=True) "
                          "or progress=True", FutureWarning, stacklevel=3)
            self.progress = not quiet
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.on_low_similarity not in ON_LOW_SIMILARITY:
            raise ValueError(f"on_low_similarity={self.on_low_similarity!r} is unknown; choose one of "
                             f"{', '.join(ON_LOW_SIMILARITY)}")
        if self.rank is not None and self.energy is not None:
            raise ValueError(f"rank={self.rank} and energy={self.energy} both given; pass one of them (or neither: "
                             "the source rank)")
        _positive_int(self.rank, "rank", allow_none=True)
        _positive_int(self.subspace_rank, "subspace_rank")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0.0 < self.energy <= 1.0):
            raise ValueError(f"energy={self.energy!r} must be a share of the update's energy in (0, 1], e.g. 0.99")
        if not (isinstance(self.min_similarity, (int, float)) and 0.0 <= self.min_similarity <= 1.0):
            raise ValueError(f"min_similarity={self.min_similarity!r} must be in [0, 1] (phi is a normalised "
                             "similarity); 0 transfers every layer")
        for name in ("exact_max_dim", "oversample", "niter", "seed"):
            _positive_int(getattr(self, name), name, minimum=0)
        if isinstance(self.cache_max_gb, bool) or not isinstance(self.cache_max_gb, (int, float)) \
                or not 0 < self.cache_max_gb < float("inf"):
            raise ValueError(f"cache_max_gb={self.cache_max_gb!r} must be a finite number of GB > 0, e.g. 10; "
                             "cache=False (--no-cache) turns the cache off")
        if self.target_name is not None and (not isinstance(self.target_name, str) or not self.target_name.strip()):
            raise ValueError(f"target_name={self.target_name!r} must be a non-empty string (the target model's Hub id "
                             "or folder) or None")


def _positive_int(value: Any, name: str, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
