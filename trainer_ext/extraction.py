"""Warm-up extraction: train full-rank for N steps, then split each target matrix into a residual and a small
trainable core on its top-k singular subspaces, ``W = R + U C V^T``, without changing the model's function.

Usage, in this order (the core must be in a parameter group before the optimizer and its LR scheduler exist)::

    modules = prepare_extraction(model, targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), k=8)
    trainer = Trainer(model, args, ..., optimizer_cls_and_kwargs=(create_directional_optimizer, {
        "lr": 1e-3, "magnitude_patterns": EXTRACTION_MAGNITUDE_PATTERNS, "magnitude_lr_ratio": 10.0}))
    WarmupExtractionCallback(warmup_steps=500).attach(trainer)
    trainer.train()

`prepare_extraction` replaces every matched `nn.Linear` by an `ExtractableLinear` (an `nn.Linear` subclass) that
keeps the original `weight` and `bias` Parameter objects under the same names, so state dicts, checkpoints and
name-based optimizer grouping are unchanged, and adds

* ``extract_C`` (k, k): a Parameter, zero until extraction. It exists from the start because an LR scheduler records
  each param group's initial LR when it is built and cannot take a group added later. Before extraction the extra
  matmuls are skipped, so it gets no gradient and Adam keeps no state for it (it stays exactly zero). Its name
  contains ``extract_C``: give it the "magnitude" role of `create_directional_optimizer` (lr * magnitude_lr_ratio,
  no weight decay) with ``magnitude_patterns=EXTRACTION_MAGNITUDE_PATTERNS`` (the defaults plus ``"extract_C"``);
* buffers ``extract_U`` (out, k), ``extract_V`` (in, k) and ``extracted`` (bool): persistent, so a checkpoint holds
  the whole extraction state and a resumed run knows whether (and in which basis) it was extracted.

Forward: ``F.linear(x, weight, bias) + ((x @ V) @ C^T) @ U^T`` (second term only once extracted).

`extract_(module)` (run by the optimizer's post-step hook right after update ``warmup_steps``, when
`WarmupExtractionCallback` asked for it with `request_extraction`): ``U, S, V`` = top-k
SVD of W (`peft_ext.linalg.top_k_svd`), ``C = U^T W V`` (= diag(S) up to round-off on the exact path; computing it
this way keeps ``R + U C V^T == W`` exactly even for the randomized path), ``W.data <- W - U C V^T`` in place (same
Parameter object, so the optimizer keeps its reference). Computed in float64, stored in the weight's dtype.

Keeping R out of the subspace (`attach_projection(optimizer, modules)`, installed by the callback)
    Two optimizer step hooks on the real (unwrapped) optimizer:

    * pre-step: ``grad(W) <- (I - U U^T) G (I - V V^T)``, so Adam's first moment only accumulates complement
      gradients (``U^T G = 0``, ``G V = 0``). A hook and not the callback's `on_pre_optimizer_step`: it runs inside
      `optimizer.step()`, i.e. only when a step really happens (accelerate skips the inner step on accumulation
      micro-steps, GradScaler on overflow), after unscaling and clipping, on the optimizer's own parameter objects,
      independently of callback order (another callback reading gradients is not affected by our ordering), and it
      also works in a hand-written loop without a Trainer;
    * post-step: Adam divides each coordinate by its own second-moment root and AdamW decays W, so a projected
      gradient alone does not give an update inside the complement. The hook therefore restores the
      off-complement part of W to its pre-step value: with ``off(M) = U U^T M + M V V^T - U U^T M V V^T`` it sets
      ``W <- W - off(W_after - W_before)``. ``off`` only needs ``U^T M`` (k, in) and ``M V`` (out, k), which the pre-step
      hook records, so no copy of W is kept. R's realised update is thus exactly in the complement: R never moves
      inside the subspace, whatever the optimizer;
    * the extraction itself: after a `request_extraction(optimizer, ...)`, the post-step hook of the next step that
      happens splits the unextracted modules and handles W's moments, so every write to W and to the optimizer
      state happens inside the optimizer's step; the callback only decides when.

Optimizer moments of W at extraction (`moments=`)
    ``"project"`` (default): ``exp_avg`` / ``momentum_buffer`` <- ``(I - U U^T) M (I - V V^T)``; ``exp_avg_sq`` and
    ``step`` are kept. The first moment is linear in the gradients, so the projection is exactly the momentum R
    would have had if its gradients had been projected all along; the in-subspace momentum belongs to C now and
    would otherwise push R into the subspace for ~1/(1-beta1) steps. The second moment is a per-coordinate scale
    estimate that cannot be projected (it is not linear); kept, it slightly over-estimates the projected gradient's
    scale, i.e. errs on the side of smaller steps, whereas resetting it (with ``step``) makes the first
    bias-corrected Adam step ``lr * sign(g)`` in every coordinate: a full-LR jolt to every weight right after the
    split. ``"reset"`` (drop W's whole state; Adam re-initialises it lazily) is available for ablations.

Checkpoint / resume: everything lives in the model's parameters/buffers and the optimizer state, both saved by the
Trainer. A run resumed after the warm-up finds ``extracted == True`` in every module and does not extract again.
Under DDP the extraction is deterministic (exact SVD, or a fixed-seed generator), hence identical on all ranks.
DeepSpeed is not supported (its engine steps its own parameter copies, so the hooks would see the wrong tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_ext._checks import check_int
from peft_ext.linalg import top_k_svd

from .callbacks import AttachableCallback, emit_log
from .optim import DEFAULT_MAGNITUDE_PATTERNS
from .targets import pattern_regex

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXTRACTION_TARGETS",
    "EXTRACTION_MAGNITUDE_PATTERNS",
    "ExtractableLinear",
    "WarmupExtractionCallback",
    "attach_projection",
    "extract_",
    "extractable_modules",
    "extraction_result",
    "handle_moments",
    "prepare_extraction",
    "request_extraction",
]

DEFAULT_EXTRACTION_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
EXTRACTION_MAGNITUDE_PATTERNS: tuple[str, ...] = DEFAULT_MAGNITUDE_PATTERNS + (r"extract_C",)
MOMENTS = ("project", "reset")
BASES = ("top", "random")
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")


class ExtractableLinear(nn.Linear):
    """An `nn.Linear` whose `weight` becomes the residual R of ``W = R + U C V^T`` after `extract_` (module docstring).

    Built from an existing Linear with `from_linear`: the same `weight` / `bias` Parameter objects are kept."""

    extract_U: torch.Tensor
    extract_V: torch.Tensor
    extracted: torch.Tensor

    def __init__(self, in_features: int, out_features: int, k: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_extraction(k)

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int) -> ExtractableLinear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = linear.weight  # the same Parameter objects: names and optimizer references stay valid
        m.bias = linear.bias
        m.train(linear.training)
        m._add_extraction(k)
        return m

    def _add_extraction(self, k: int) -> None:
        w = self.weight
        self.k = k
        self.extract_C = nn.Parameter(torch.zeros(k, k, device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        self.register_buffer("extract_U", torch.zeros(self.out_features, k, device=w.device, dtype=w.dtype))
        self.register_buffer("extract_V", torch.zeros(self.in_features, k, device=w.device, dtype=w.dtype))
        self.register_buffer("extracted", torch.zeros((), dtype=torch.bool, device=w.device))
        self._is_extracted = False  # python mirror of the buffer: no device sync in forward

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._is_extracted = bool(self.extracted)

    @property
    def is_extracted(self) -> bool:
        return self._is_extracted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self._is_extracted:
            out = out + ((x @ self.extract_V) @ self.extract_C.T) @ self.extract_U.T
        return out

    def merged_weight(self) -> torch.Tensor:
        """The effective matrix ``R + U C V^T`` (detached)."""
        w = self.weight.detach()
        if self._is_extracted:
            w = w + self.extract_U @ self.extract_C.detach() @ self.extract_V.T
        return w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, extracted={self._is_extracted}"


def prepare_extraction(
    model: nn.Module, targets: Iterable[str] | str = DEFAULT_EXTRACTION_TARGETS, k: int = 8
) -> list[ExtractableLinear]:
    """Replace every `nn.Linear` of `model` matched by `targets` (aliases of `trainer_ext.targets`, module-name
    suffixes, or ``re:<regex>``) by an `ExtractableLinear` with a (k, k) core, in place; returns the new modules.

    Call it BEFORE creating the optimizer (and the Trainer's LR scheduler): ``extract_C`` must be in a param group
    from the start. Give it lr * ratio and no weight decay with
    ``create_directional_optimizer(..., magnitude_patterns=EXTRACTION_MAGNITUDE_PATTERNS)``.
    A plain model only (no PEFT adapters: the weight is trained full-rank during the warm-up)."""
    fn = "prepare_extraction"
    k = check_int(k, "k", ge=1, where=f"{fn}: ", fix="the core needs at least one direction, e.g. k=8")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError(f"{fn}: targets is empty, got targets={patterns!r}; name the matrices, e.g. ['mlp.fc1']")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()
    if BaseTunerLayer and any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            f"{fn}: model={type(model).__name__} holds PEFT adapter layers; warm-up extraction re-parametrises the "
            "full-rank weights of a plain model: call it on the base model without get_peft_model"
        )
    regexes = [pattern_regex(p) for p in patterns]
    hits = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and any(r.search(n) for r in regexes)]
    if not hits:
        raise ValueError(
            f"{fn}: targets={patterns} matched no nn.Linear of {type(model).__name__}; use aliases "
            f"{list(DEFAULT_EXTRACTION_TARGETS)}, module-name suffixes as in model.named_modules(), or 're:<regex>'"
        )
    too_small = [f"{n} {(m.out_features, m.in_features)}" for n, m in hits if k > min(m.out_features, m.in_features)]
    if too_small:
        smallest = min(min(m.out_features, m.in_features) for _, m in hits)
        raise ValueError(
            f"{fn}: k={k} is larger than the smaller dimension of {too_small[:4]}; choose k <= {smallest} or other targets"
        )
    out = []
    for name, lin in hits:
        if isinstance(lin, ExtractableLinear):
            if lin.k != k:
                raise ValueError(f"{fn}: {name} is already extractable with k={lin.k}, got k={k}; use k={lin.k}")
            out.append(lin)
            continue
        new = ExtractableLinear.from_linear(lin, k)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        out.append(new)
    return out


def extractable_modules(model: nn.Module) -> list[ExtractableLinear]:
    return [m for m in model.modules() if isinstance(m, ExtractableLinear)]


def _complement(m: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) M (I - V V^T), without forming the projectors."""
    m = m - u @ (u.T @ m)
    return m - (m @ v) @ v.T


@torch.no_grad()
def extract_(
    module: ExtractableLinear,
    *,
    exact_max_dim: int = 512,
    niter: int = 4,
    generator: torch.Generator | None = None,
    basis: str = "top",
) -> dict[str, float]:
    """Split ``W = R + U C V^T`` in place (module docstring); returns {"energy": ||C||_F^2 / ||W||_F^2}.

    ``basis="top"``: U, V = W's top-k singular vectors. ``basis="random"``: U, V = orthonormal bases of uniformly
    random k-dimensional subspaces (QR of Gaussian matrices drawn from `generator`), ``C = U^T W V``: the same
    function-preserving split in directions that know nothing about W or the data: the control that shows whether
    the chosen directions matter or only the extra high-LR parameters do."""
    if not isinstance(module, ExtractableLinear):
        raise TypeError(f"extract_: module must be an ExtractableLinear (see prepare_extraction), got {type(module).__name__}")
    if module.is_extracted:
        raise ValueError("extract_: module is already extracted (extracted=True); extract each module once")
    if basis not in BASES:
        raise ValueError(f"extract_: basis must be one of {BASES}, got basis={basis!r}; 'top' (the top-k singular "
                         "subspaces) or 'random' (the data-blind control)")
    w = module.weight
    w64 = w.detach().double()
    if basis == "top":
        u, _, v = top_k_svd(w64, module.k, exact_max_dim=exact_max_dim, niter=niter, generator=generator)
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        u = torch.linalg.qr(torch.randn(w64.shape[0], module.k, generator=gen, dtype=torch.float64))[0].to(w64.device)
        v = torch.linalg.qr(torch.randn(w64.shape[1], module.k, generator=gen, dtype=torch.float64))[0].to(w64.device)
    c = u.T @ w64 @ v
    w.data.copy_((w64 - u @ c @ v.T).to(w.dtype))
    module.extract_U.copy_(u.to(module.extract_U.dtype))
    module.extract_V.copy_(v.to(module.extract_V.dtype))
    module.extract_C.data.copy_(c.to(module.extract_C.dtype))
    module.extracted.fill_(True)
    module._is_extracted = True
    total = float(w64.pow(2).sum())
    return {"energy": float(c.pow(2).sum()) / total if total > 0 else 0.0}


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


@torch.no_grad()
def handle_moments(optimizer: Any, modules: Iterable[ExtractableLinear], moments: str = "project") -> None:
    """Project (or drop) the optimizer state of each extracted module's W (module docstring)."""
    if moments not in MOMENTS:
        raise ValueError(f"handle_moments: moments must be one of {MOMENTS}, got moments={moments!r}; use 'project'")
    opt = _inner(optimizer)
    for m in modules:
        st = opt.state.get(m.weight)
        if not st:
            continue
        if moments == "reset":
            opt.state[m.weight] = {}
            continue
        for key in _FIRST_MOMENTS:
            t = st.get(key)
            if isinstance(t, torch.Tensor) and t.shape == m.weight.shape:
                u, v = m.extract_U.to(t.dtype), m.extract_V.to(t.dtype)
                t.copy_(_complement(t, u, v))


class _Projection:
    """The two step hooks of `attach_projection` (module docstring), and the extraction they carry out when
    `request_extraction` asked for one: right after the next optimizer step, in the post-step hook."""

    def __init__(self, modules: list[ExtractableLinear]) -> None:
        self.modules = modules
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: dict[str, Any] | None = None  # extract_ settings of a requested extraction
        self.done: dict[str, float] | None = None  # {"modules", "energy"} of the last extraction, until taken

    @torch.no_grad()
    def pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.before = {}
        for i, m in enumerate(self.modules):
            if not m.is_extracted:
                continue
            u, v, w = m.extract_U, m.extract_V, m.weight
            if w.grad is not None:
                w.grad.copy_(_complement(w.grad, u.to(w.grad.dtype), v.to(w.grad.dtype)))
            self.before[i] = (u.T @ w, w @ v)

    @torch.no_grad()
    def post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for i, (a0, b0) in self.before.items():
            m = self.modules[i]
            u, v, w = m.extract_U, m.extract_V, m.weight
            a = u.T @ w - a0  # U^T (W_after - W_before)
            b = w @ v - b0  # (W_after - W_before) V
            w.sub_(u @ a + b @ v.T - u @ (a @ v) @ v.T)
        self.before = {}
        if self.pending is not None:
            settings, self.pending = self.pending, None
            self._extract(optimizer, **settings)

    def _extract(self, optimizer: Any, *, moments: str, seed: int, **extract_kwargs: Any) -> None:
        todo = [m for m in self.modules if not m.is_extracted]
        if not todo:
            return
        gen = torch.Generator().manual_seed(seed)
        energies = [extract_(m, generator=gen, **extract_kwargs)["energy"] for m in todo]
        handle_moments(optimizer, todo, moments)
        for m in todo:
            # W's gradient of this step belongs to the weight before the split: it is no gradient of R (nor of C),
            # and the optimizer has used it; dropped, nothing after this step can read it as one
            m.weight.grad = None
        self.done = {"modules": float(len(todo)), "energy": sum(energies) / len(energies)}


def attach_projection(optimizer: Any, modules: Iterable[ExtractableLinear]) -> tuple[Any, Any]:
    """Register the gradient/update projection hooks of `modules` on `optimizer` (the inner one if wrapped); returns
    the two hook handles (``.remove()`` them to detach). Modules not yet extracted are skipped at every step, so this
    can be done right after creating the optimizer. Done once per optimizer (a second call returns the same handles)."""
    opt = _inner(optimizer)
    existing = getattr(opt, "_extraction_hooks", None)
    if existing is not None:
        return existing
    proj = _Projection(list(modules))
    handles = (opt.register_step_pre_hook(proj.pre), opt.register_step_post_hook(proj.post))
    opt._extraction_hooks = handles
    opt._extraction_projection = proj
    return handles


def _projection(optimizer: Any) -> _Projection:
    proj = getattr(_inner(optimizer), "_extraction_projection", None)
    if proj is None:
        raise ValueError("the optimizer has no extraction hooks: call attach_projection(optimizer, modules) first")
    return proj


def request_extraction(optimizer: Any, *, moments: str = "project", exact_max_dim: int = 512, niter: int = 4,
                       seed: int = 0, basis: str = "top") -> None:
    """Extract the modules of `attach_projection(optimizer, ...)` that are not extracted yet right after the
    optimizer's next step, in its post-step hook: `extract_` each (one generator seeded with `seed` across them),
    then `handle_moments(optimizer, ..., moments)`. A step that does not happen (GradScaler skips one on overflow)
    defers it to the next. `WarmupExtractionCallback` calls this before update `warmup_steps`; a hand-written loop
    can call it itself. `extraction_result(optimizer)` then gives what was done."""
    if moments not in MOMENTS:
        raise ValueError(f"request_extraction: moments must be one of {MOMENTS}, got moments={moments!r}; use 'project'")
    if basis not in BASES:
        raise ValueError(f"request_extraction: basis must be one of {BASES}, got basis={basis!r}; 'top' (the top-k "
                         "singular subspaces) or 'random' (the data-blind control)")
    _projection(optimizer).pending = dict(moments=moments, exact_max_dim=exact_max_dim, niter=niter, seed=seed,
                                          basis=basis)


def extraction_result(optimizer: Any) -> dict[str, float] | None:
    """{"modules": how many were extracted, "energy": their mean ||C||^2/||W||^2} of the extraction the optimizer's
    hooks carried out since the last call, or None (nothing requested, or the requested step did not happen yet)."""
    proj = _projection(optimizer)
    done, proj.done = proj.done, None
    return done


class WarmupExtractionCallback(AttachableCallback):
    """Extract every `ExtractableLinear` of the model once, at the end of optimizer update `warmup_steps`.

    It only decides when. On train begin it checks the model was prepared and installs the projection hooks on the
    optimizer; before update `warmup_steps` (or any later one while modules are unextracted) it asks the optimizer's
    post-step hook to extract them right after that update (`request_extraction`; a run resumed after the warm-up
    finds them extracted and asks nothing). The hook splits the weights and handles W's moments (`moments`, module
    docstring); at that step's end the callback logs ``extraction/step``, ``extraction/modules`` and
    ``extraction/energy`` (mean ||C||^2/||W||^2) through `callbacks.emit_log`. Bind it with `attach(trainer)` so the
    values reach the `report_to` backends; unbound they go to `state.log_history` only."""

    def __init__(self, warmup_steps: int, *, moments: str = "project", exact_max_dim: int = 512, niter: int = 4,
                 seed: int = 0, basis: str = "top") -> None:
        fn = "WarmupExtractionCallback"
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", ge=1, where=f"{fn}: ",
                                      fix="extract after at least one update")
        if moments not in MOMENTS:
            raise ValueError(f"{fn}: moments must be one of {MOMENTS}, got moments={moments!r}; use 'project'")
        if basis not in BASES:
            raise ValueError(f"{fn}: basis must be one of {BASES}, got basis={basis!r}; 'top' (the top-k singular "
                             "subspaces) or 'random' (the data-blind control)")
        self.moments, self.exact_max_dim, self.niter, self.seed = moments, exact_max_dim, niter, seed
        self.basis = basis
        self.modules: list[ExtractableLinear] = []
        self.extracted_at: int | None = None
        self._optimizer = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "deepspeed", None):
            raise RuntimeError(
                "WarmupExtractionCallback cannot run under DeepSpeed: its engine steps its own parameter copies, so "
                "the projection hooks would see the wrong tensors. Run without DeepSpeed (DDP works)."
            )
        self.modules = extractable_modules(model)
        if not self.modules:
            raise ValueError(
                "WarmupExtractionCallback: the model has no ExtractableLinear; call prepare_extraction(model, ...) "
                "before creating the Trainer/optimizer"
            )
        if optimizer is None:
            raise RuntimeError("WarmupExtractionCallback: the Trainer passed no optimizer to on_train_begin")
        in_opt = {id(p) for g in _inner(optimizer).param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if "extract_C" in n and p.requires_grad and id(p) not in in_opt]
        if missing:
            raise ValueError(
                f"WarmupExtractionCallback: {missing[:3]} are not in the optimizer: prepare_extraction must run before "
                "the optimizer is created (its param groups cannot be extended once the LR scheduler exists)"
            )
        attach_projection(optimizer, self.modules)
        self._optimizer = optimizer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # only decides when: the update about to happen is update number global_step + 1, and once it is the last
        # warm-up update (or later, after a resume from an unextracted checkpoint) the optimizer's post-step hook
        # splits the weights right after it, before anything else sees the model
        if self._optimizer is None or state.global_step + 1 < self.warmup_steps:
            return
        if any(not m.is_extracted for m in self.modules):
            request_extraction(self._optimizer, moments=self.moments, exact_max_dim=self.exact_max_dim,
                               niter=self.niter, seed=self.seed, basis=self.basis)

    def on_step_end(self, args, state, control, **kwargs):
        done = extraction_result(self._optimizer) if self._optimizer is not None else None
        if done is None:
            return
        if state.global_step > self.warmup_steps:
            logger.warning("warm-up extraction at step %d, later than warmup_steps=%d (resumed from an unextracted "
                           "checkpoint?)", state.global_step, self.warmup_steps)
        self.extracted_at = state.global_step
        values = {"extraction/step": float(state.global_step), "extraction/modules": done["modules"],
                  "extraction/energy": done["energy"]}
        logger.info("warm-up extraction at step %d: %d modules, mean energy %.4f", state.global_step,
                    int(done["modules"]), values["extraction/energy"])
        return emit_log(self, args, state, control, values)
