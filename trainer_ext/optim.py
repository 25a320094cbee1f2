"""Directional optimizer: parameter groups by role, spectral clamps of adapter branches, and amplification of the
update inside stable singular subspaces.

`create_directional_optimizer(model, args=training_args, ...)` builds an ordinary torch optimizer (AdamW by default)
whose class is a thin subclass of the chosen optimizer class and of the `DirectionalOptimizer` mixin. Use it directly,
or through the Trainer::

    Trainer(model, args, ..., optimizer_cls_and_kwargs=(create_directional_optimizer, {"args": args, ...}))

`args` (a `TrainingArguments`) supplies `learning_rate`, `weight_decay` and, for optimizers that take them (Adam,
AdamW), `adam_beta1`/`adam_beta2`/`adam_epsilon`; an explicit `lr=`, `weight_decay=`, `betas=` or `eps=` wins. Through
a plain Trainer pass the arguments object in the kwargs dict as above: transformers calls a factory as
``factory()(opt_model, **kwargs)`` (transformers/trainer.py, `create_optimizer`) and hands it neither the arguments
nor any of their values. `SpectralTrainer` adds `args` by itself when the kwargs name neither `args` nor `lr`.
Calling `create_directional_optimizer()` without a model returns the factory itself, which makes that zero-argument
"instantiation" work.

Parameter groups (built once, at construction)
    Every trainable parameter gets one role, first match wins:

    * ``"magnitude"``: names matching `magnitude_patterns` (DoRA's `lora_magnitude_vector`, SubspaceLoRA's core
      `subspace_C`, scale vectors such as AdaLoRA's `lora_E`, VeRA's `vera_lambda_b/d`, IA3's `ia3_l`) get
      ``lr * magnitude_lr_ratio`` and no weight decay: they are few, scale-like, and decaying them pulls the adapted
      layer towards zero output instead of towards the pre-trained function;
    * ``"no_decay"``: names matching `no_decay_patterns` (biases by default; add e.g. ``"embed"`` for embeddings) and
      the weights of normalisation modules (any module whose class name contains ``"Norm"``: LayerNorm, RMSNorm,
      LlamaRMSNorm, GroupNorm, BatchNorm...) get ``lr`` and no weight decay;
    * ``"default"``: everything else, ``lr`` and `weight_decay`.

    Patterns are Python regular expressions applied with `re.search` to the full parameter name from
    `model.named_parameters()` (e.g. ``base_model.model.0.lora_magnitude_vector.default.weight``), so a plain
    substring such as ``"lora_B"`` works too (an unescaped ``.`` matches any character, which only widens a match).
    Groups are created once and never added later: an LR scheduler records each group's initial LR when it is
    created (the Trainer creates it right after the optimizer) and a group added afterwards crashes it. Empty roles
    are skipped. The default group comes first, so the LR the Trainer logs (`get_last_lr()[0]`) is the base LR.

Why a subclass of the optimizer class (and not a wrapper object)
    The instance *is* an AdamW (or whatever `optimizer_cls` is): the Trainer's LR scheduler sees the real
    `param_groups` and scales every group's own initial LR, so the magnitude group keeps its ratio throughout the
    schedule; gradient clipping acts on the model's gradients before `step()` and needs nothing from us;
    accelerate's `AcceleratedOptimizer` (and GradScaler, which skips `step()` on overflow - then our hooks do not run
    either) wraps it like any optimizer; `isinstance(opt, torch.optim.AdamW)` keeps holding. The extra work runs in
    step hooks registered on the instance (`register_step_pre_hook` / `register_step_post_hook`), not in an
    overridden `step()`: torch wraps each optimizer class's `step` with a hook-running profiler wrapper, so an
    override calling `super().step()` would run every registered hook twice. `state_dict()`/`load_state_dict()`
    are overridden to carry our own state under the extra key ``"directional"`` (tensors, numbers and strings only,
    so the Trainer's ``torch.load(..., weights_only=True)`` on resume accepts it); torch's loader ignores unknown keys
    anyway, we pop ours before delegating. The subclasses are registered in this module under stable names, so an
    optimizer can still be pickled.

    DeepSpeed is refused: its engine runs the optimizer step inside `backward()`/`engine.step()` on its own
    (partitioned, flattened) copies of the parameters, so our hooks would see cleared gradients and the wrong
    tensors. FSDP with flattened parameters has the same problem for clamps and amplification (they need each
    2-D weight whole); plain parameter groups still work there.

Hooks, in the order they run around each `step()`
    1. Pre-step (amplification only): for every amplified target whose tracker is stable, snapshot the parameter
       (``p_before``). Nothing is copied for unstable targets, so memory is spent only once amplification is on.
    2. The optimizer's own step.
    3. Post-step, amplification: ``D = p_after - p_before`` is the step's realised parameter change (Adam's
       preconditioned update plus decoupled weight decay) and is replaced by
       ``D + (alpha - 1) U U^T D V V^T`` (``amplify_mode="subspace"``), or by ``D + (alpha - 1) (D - U U^T D V V^T)``
       (``"bulk"``: the control that amplifies everything except the tracked subspace, for ablations). U (out, k)
       and V (in, k) are the tracker's top-k singular vectors of the target's momentum.
       Why the update and not the gradient: Adam divides each coordinate by the root of its second moment, which
       grows with the squared gradient, so multiplying the gradient by alpha inside a subspace is almost completely
       normalised away (exactly, per coordinate, once the moments have converged); with SGD it would work but
       also changes the momentum the subspace is estimated from. Scaling the realised change is optimizer-agnostic,
       exact, and leaves the optimizer's state untouched.
    4. Post-step, tracking: every `amplify_every` steps each target's `SubspaceTracker(k=amplify_rank)` is updated
       with the target's momentum (Adam/AdamW `exp_avg`, SGD `momentum_buffer`; the gradient when there is none).
       A target becomes stable once `stability_checks` consecutive checks kept ``min(cos_u_mean, cos_v_mean) >=
       stability_threshold`` (principal cosines against the previous check); amplification starts at the next step.
    5. Post-step, spectral clamp (last, so the bound holds after everything else):

       * adapter branches - PEFT LoRA layers (``lora_A``/``lora_B`` of each active adapter) and peft-ext layers
         exposing ``lora_factors(adapter) -> (A, B)`` - keep ``sigma_max(scaling * B @ A) <= c / sqrt(d_in)``.
         sigma_max is exact and cheap: the SVD of the r x r core of two thin QRs (`low_rank_top_k`). Above the bound
         the trainable factor is scaled (B if it is trainable, else A) so sigma_max equals the bound. When the
         effective delta also holds a frozen part (peft-ext split mode: ``[B, -B0] @ [A; A0]``) the scale is found by
         bisection (sigma_max is convex in it); if the frozen part alone exceeds the bound a warning is issued once
         and the branch is left alone;
       * dense 2-D parameters selected by `clamp_patterns` (none by default) keep ``sigma_max(W) <= c / sqrt(d_in)``,
         sigma_max from a power iteration warm-started with the previous step's vector (exact for small matrices).

    Clamp and amplification run under `torch.no_grad()` and in place on the parameters.

State
    `state_dict()` adds ``"directional"``: the step counter, every tracker's `state_dict()` (u, s, v, history,
    generator state), how many steps each target was amplified, and the power-iteration vectors, so a resumed run
    continues exactly like an uninterrupted one. `amplifier_state()` gives per-target numbers for logging,
    `describe()` the groups.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from peft_ext._checks import check_int, check_number

from .spectral import SubspaceTracker, low_rank_top_k, sigma_max

__all__ = [
    "DEFAULT_MAGNITUDE_LR_RATIO",
    "DEFAULT_MAGNITUDE_PATTERNS",
    "DEFAULT_NO_DECAY_PATTERNS",
    "DirectionalOptimizer",
    "GroupInfo",
    "create_directional_optimizer",
]

DEFAULT_MAGNITUDE_PATTERNS: tuple[str, ...] = (
    r"lora_magnitude_vector",  # DoRA
    r"subspace_C",  # SubspaceLoRA's core
    r"(^|\.)lora_E(\.|$)",  # AdaLoRA's singular values
    r"vera_lambda_[bd]",  # VeRA's scale vectors
    r"(^|\.)ia3_l(\.|$)",  # IA3
)
DEFAULT_NO_DECAY_PATTERNS: tuple[str, ...] = (r"(^|\.)bias$",)
ROLES = ("default", "no_decay", "magnitude")
AMPLIFY_MODES = ("subspace", "bulk")

_FN = "create_directional_optimizer"
# One default everywhere (`SpectralTrainingArguments.magnitude_lr_ratio` uses it too): 1 leaves every group at the base
# LR, so nothing trains faster than the user asked unless they say so.
DEFAULT_MAGNITUDE_LR_RATIO = 1.0


class GroupInfo(NamedTuple):
    role: str
    n_params: int  # number of scalar parameters (sum of numel) in the group
    lr: float  # the group's current LR (after the scheduler's updates)
    weight_decay: float


# ----------------------------------------------------------------------------------------------- helpers


def _patterns(value: Any, field: str) -> tuple[str, ...]:
    """A pattern list (a single string is one pattern, not its characters), each compiled once to validate it."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{_FN}: {field} must be a list of name patterns (regexes), got {value!r}") from None
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{_FN}: {field} must hold strings (regexes), got {p!r} of type {type(p).__name__}")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{_FN}: {field} contains an invalid regex {p!r} ({e}); escape special characters") from None
    return out


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _is_deepspeed(model: Any) -> bool:
    if "DeepSpeed" in type(model).__name__ or getattr(model, "is_deepspeed_enabled", False) is True:
        return True
    try:  # an initialised accelerate state that runs DeepSpeed (the Trainer passes the unwrapped model)
        from accelerate.state import AcceleratorState

        dist = AcceleratorState._shared_state.get("distributed_type")
        return dist is not None and "DEEPSPEED" in str(dist).upper()
    except Exception:  # pragma: no cover - accelerate missing or changed
        return False


class _Branch(NamedTuple):
    """One adapter branch to clamp: delta W = scaling * B @ A (factors from `factors()`), `param` is scaled."""

    name: str
    module: nn.Module
    adapter: str
    param: nn.Parameter  # the trainable factor that gets scaled
    peft_lora: bool  # True: A, B are the parameters themselves (delta is linear in `param`, no frozen part)


# ------------------------------------------------------------------------------------------------ optimizer


class DirectionalOptimizer:
    """Mixin of every optimizer built by `create_directional_optimizer`; the concrete class also derives from the
    chosen optimizer class (e.g. `DirectionalAdamW(DirectionalOptimizer, torch.optim.AdamW)`), see the module
    docstring. Attributes: `role_of` {param: role}, `name_of` {param: name}, `trackers` {name: SubspaceTracker}."""

    # set by _setup_directional
    role_of: dict[torch.Tensor, str]
    name_of: dict[torch.Tensor, str]
    trackers: dict[str, SubspaceTracker]

    def _setup_directional(
        self,
        *,
        names: dict[torch.Tensor, str],
        roles: dict[torch.Tensor, str],
        amplify: float,
        amplify_mode: str,
        amplify_targets: dict[str, torch.Tensor],
        amplify_rank: int,
        amplify_every: int,
        stability_threshold: float,
        stability_checks: int,
        spectral_clamp: float | None,
        branches: list[_Branch],
        dense_clamp: dict[str, tuple[torch.Tensor, int]],
    ) -> None:
        self.name_of = names
        self.role_of = roles
        self.amplify = amplify
        self.amplify_mode = amplify_mode
        self.amplify_every = amplify_every
        self.stability_threshold = stability_threshold
        self.stability_checks = stability_checks
        self.spectral_clamp = spectral_clamp
        self._targets = amplify_targets
        self.trackers = {n: SubspaceTracker(amplify_rank) for n in amplify_targets}
        self._amplified_steps = {n: 0 for n in amplify_targets}
        self._branches = branches
        self._dense_clamp = dense_clamp
        self._power_v: dict[str, torch.Tensor] = {}
        self._directional_step = 0
        self._before: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()
        self.register_step_pre_hook(_pre_step_hook)
        self.register_step_post_hook(_post_step_hook)

    # ------------------------------------------------------------------------------------------- reporting
    def describe(self) -> list[GroupInfo]:
        """One `GroupInfo(role, n_params, lr, weight_decay)` per param group; n_params counts scalars (numel)."""
        return [
            GroupInfo(g.get("role", "?"), sum(p.numel() for p in g["params"]), float(g["lr"]), float(g.get("weight_decay", 0.0)))
            for g in self.param_groups
        ]

    def amplifier_state(self) -> dict[str, dict[str, Any]]:
        """{target name: {"active", "checks", "last_cos", "amplified_steps"}} for logging.

        `active`: the next step is amplified (alpha != 1 and the tracker is stable); `checks`: tracker updates so
        far; `last_cos`: min(cos_u_mean, cos_v_mean) of the latest comparison (nan before the second check);
        `amplified_steps`: how many steps were amplified so far."""
        out = {}
        for n, t in self.trackers.items():
            out[n] = {
                "active": self.amplify != 1.0 and t.is_stable(self.stability_threshold, self.stability_checks),
                "checks": t.num_checks,
                "last_cos": float(min(t.history[-1])) if t.history else float("nan"),
                "amplified_steps": self._amplified_steps[n],
            }
        return out

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["directional"] = {
            "step": self._directional_step,
            "trackers": {n: t.state_dict() for n, t in self.trackers.items()},
            "amplified_steps": dict(self._amplified_steps),
            "power_v": {n: v.detach().clone() for n, v in self._power_v.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("directional", None)
        super().load_state_dict(state_dict)
        if extra is None:
            if self.trackers:
                warnings.warn(
                    "DirectionalOptimizer.load_state_dict: the state has no 'directional' entry (saved by a plain "
                    "optimizer?); the amplification trackers start from scratch"
                )
            return
        missing = sorted(set(self.trackers) - set(extra.get("trackers", {})))
        unknown = sorted(set(extra.get("trackers", {})) - set(self.trackers))
        if missing or unknown:
            raise ValueError(
                f"DirectionalOptimizer.load_state_dict: the saved amplify targets differ from this optimizer's: "
                f"missing in the state {missing}, not targets here {unknown}; build the optimizer with the same "
                "amplify_targets as the run that saved it"
            )
        self._directional_step = int(extra.get("step", 0))
        for n, st in extra.get("trackers", {}).items():
            self.trackers[n].load_state_dict(st)
        for n, v in extra.get("amplified_steps", {}).items():
            if n in self._amplified_steps:
                self._amplified_steps[n] = int(v)
        self._power_v = {n: v.detach().clone() for n, v in extra.get("power_v", {}).items() if n in self._dense_clamp}

    # ------------------------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def _directional_pre_step(self) -> None:
        self._before = {}
        if self.amplify == 1.0:
            return
        for n, p in self._targets.items():
            if self.trackers[n].is_stable(self.stability_threshold, self.stability_checks):
                self._before[n] = p.detach().clone()

    @torch.no_grad()
    def _directional_post_step(self) -> None:
        self._directional_step += 1
        self._amplify_updates()
        if self._targets and self._directional_step % self.amplify_every == 0:
            self._update_trackers()
        if self.spectral_clamp is not None:
            self._clamp()

    def _amplify_updates(self) -> None:
        before, self._before = self._before, {}
        for n, p0 in before.items():
            p = self._targets[n]
            t = self.trackers[n]
            work = torch.float64 if p.dtype == torch.float64 else torch.float32
            d = p.detach().to(work) - p0.to(work)
            u = t.u.to(device=p.device, dtype=work)
            v = t.v.to(device=p.device, dtype=work)
            proj = u @ (u.T @ d @ v) @ v.T
            extra = proj if self.amplify_mode == "subspace" else d - proj
            p.add_(((self.amplify - 1.0) * extra).to(p.dtype))
            self._amplified_steps[n] += 1

    def _momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        st = self.state.get(p, {})
        for key in ("exp_avg", "momentum_buffer"):
            m = st.get(key)
            if isinstance(m, torch.Tensor) and m.shape == p.shape:
                return m
        return p.grad

    def _update_trackers(self) -> None:
        for n, p in self._targets.items():
            m = self._momentum(p)
            if m is None:
                continue
            self.trackers[n].update(m.detach())

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg)

    def _clamp(self) -> None:
        c = self.spectral_clamp
        for br in self._branches:
            self._clamp_branch(br, c)
        for n, (p, d_in) in self._dense_clamp.items():
            bound = c / math.sqrt(d_in)
            sigma, v = sigma_max(p.detach(), v0=self._power_v.get(n))
            self._power_v[n] = v.detach()
            if sigma > bound:
                p.mul_(bound / sigma)

    def _clamp_branch(self, br: _Branch, c: float) -> None:
        module, adapter = br.module, br.adapter
        if getattr(module, "merged", False) or adapter not in module.active_adapters:
            return

        def sigma() -> tuple[float, int]:
            if br.peft_lora:
                a = module.lora_A[adapter].weight
                b = module.lora_B[adapter].weight
            else:
                a, b = module.lora_factors(adapter)
            a = a.detach().reshape(a.shape[0], -1)
            b = b.detach().reshape(b.shape[0], -1)
            s = float(module.scaling[adapter])
            if b.shape[1] != a.shape[0]:
                return float("nan"), a.shape[1]
            return abs(s) * float(low_rank_top_k(b, a, 1)[1][0]), a.shape[1]

        f1, d_in = sigma()
        if math.isnan(f1):
            self._warn_once(br.name, f"spectral clamp: cannot form B @ A for {br.name}; it is not clamped")
            return
        bound = c / math.sqrt(d_in)
        if f1 <= bound:
            return
        p = br.param
        if br.peft_lora:
            p.mul_(bound / f1)
            return
        # generic layer: delta(t) = t M + F is affine in the scale t of the trainable factor; sigma_max is convex in t
        p1 = p.detach().clone()
        p.zero_()
        f0, _ = sigma()
        if f0 <= 1e-12 * f1:  # no frozen part: sigma_max(t) = t f1 exactly
            p.copy_(p1 * (bound / f1))
            return
        if f0 >= bound:
            p.copy_(p1)
            self._warn_once(
                br.name,
                f"spectral clamp: the frozen part of {br.name} alone has sigma_max {f0:.4g} > bound {bound:.4g} "
                f"(spectral_clamp={c}); the branch is left unclamped. Raise spectral_clamp to bound it.",
            )
            return
        lo, hi = 0.0, 1.0  # f(lo) <= bound < f(hi); f convex with f(0) < bound => a single crossing
        for _ in range(100):  # relative tolerance: a huge step can put the crossing at t ~ 1e-7
            mid = 0.5 * (lo + hi)
            p.copy_(p1 * mid)
            if sigma()[0] > bound:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-10 * hi:
                break
        p.copy_(p1 * lo)


def _pre_step_hook(optimizer: DirectionalOptimizer, args: Any, kwargs: Any) -> None:
    optimizer._directional_pre_step()


def _post_step_hook(optimizer: DirectionalOptimizer, args: Any, kwargs: Any) -> None:
    optimizer._directional_post_step()


_CLASSES: dict[type, type] = {}


def _directional_class(optimizer_cls: type) -> type:
    """`Directional<Name>(DirectionalOptimizer, optimizer_cls)`, cached and registered in this module (picklable)."""
    cls = _CLASSES.get(optimizer_cls)
    if cls is None:
        name = f"Directional{optimizer_cls.__name__}"
        qual = name if getattr(sys.modules[__name__], name, None) is None else f"{name}_{len(_CLASSES)}"
        cls = type(qual, (DirectionalOptimizer, optimizer_cls), {"__module__": __name__, "__qualname__": qual})
        setattr(sys.modules[__name__], qual, cls)
        _CLASSES[optimizer_cls] = cls
    return cls


# -------------------------------------------------------------------------------------------- discovery


def _owner_modules(model: nn.Module) -> dict[int, nn.Module]:
    """id(param) -> the module that directly owns it."""
    out = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            out.setdefault(id(p), mod)
    return out


def _find_branches(model: nn.Module, in_optimizer: set[int]) -> list[_Branch]:
    branches = []
    for mname, mod in model.named_modules():
        scaling = getattr(mod, "scaling", None)
        if not isinstance(scaling, dict):
            continue
        active = getattr(mod, "active_adapters", None) or []
        if callable(getattr(mod, "lora_factors", None)):
            layer_names = tuple(getattr(mod, "adapter_layer_names", ()))
            for ad in active:
                if ad not in scaling:
                    continue
                factors = {}
                for attr in layer_names:
                    container = getattr(mod, attr, None)
                    if container is None or ad not in container:
                        continue
                    entry = container[ad]
                    w = entry.weight if isinstance(entry, nn.Module) else entry
                    if isinstance(w, nn.Parameter):
                        factors["B" if attr.endswith("B") else "A" if attr.endswith("A") else attr] = w
                p = _pick_trainable(factors, in_optimizer)
                if p is not None:
                    branches.append(_Branch(f"{mname}[{ad}]", mod, ad, p, False))
        elif isinstance(getattr(mod, "lora_A", None), nn.ModuleDict) and isinstance(getattr(mod, "lora_B", None), nn.ModuleDict):
            for ad in active:
                if ad not in scaling or ad not in mod.lora_A or ad not in mod.lora_B:
                    continue
                factors = {"A": mod.lora_A[ad].weight, "B": mod.lora_B[ad].weight}
                p = _pick_trainable(factors, in_optimizer)
                if p is not None:
                    branches.append(_Branch(f"{mname}[{ad}]", mod, ad, p, True))
    return branches


def _pick_trainable(factors: dict[str, torch.Tensor], in_optimizer: set[int]) -> torch.Tensor | None:
    for key in ("B", "A"):
        p = factors.get(key)
        if p is not None and p.requires_grad and id(p) in in_optimizer:
            return p
    return None


# ---------------------------------------------------------------------------------------------- factory


def _from_training_args(
    args: Any, lr: float | None, weight_decay: float | None, optimizer_cls: type, optimizer_kwargs: dict[str, Any]
) -> tuple[float | None, float | None, dict[str, Any]]:
    """Fill lr / weight_decay / betas / eps from a TrainingArguments where the caller did not set them."""
    missing = [a for a in ("learning_rate", "weight_decay") if not hasattr(args, a)]
    if missing:
        raise TypeError(
            f"{_FN}: args must be a transformers.TrainingArguments (it has no {', '.join(missing)}), got "
            f"{type(args).__name__}; pass trainer.args or your TrainingArguments"
        )
    lr = args.learning_rate if lr is None else lr
    weight_decay = args.weight_decay if weight_decay is None else weight_decay
    kwargs = dict(optimizer_kwargs)
    try:
        import inspect

        accepted = set(inspect.signature(optimizer_cls.__init__).parameters)
    except (TypeError, ValueError):  # a C-implemented or odd signature: set nothing implicitly
        accepted = set()
    if "betas" in accepted and "betas" not in kwargs and hasattr(args, "adam_beta1"):
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
    if "eps" in accepted and "eps" not in kwargs and hasattr(args, "adam_epsilon"):
        kwargs["eps"] = args.adam_epsilon
    return lr, weight_decay, kwargs


def create_directional_optimizer(
    model: nn.Module | None = None,
    *,
    args: Any = None,
    lr: float | None = None,
    optimizer_cls: type = torch.optim.AdamW,
    weight_decay: float | None = None,
    magnitude_lr_ratio: float = DEFAULT_MAGNITUDE_LR_RATIO,
    magnitude_patterns: Iterable[str] = DEFAULT_MAGNITUDE_PATTERNS,
    no_decay_patterns: Iterable[str] = DEFAULT_NO_DECAY_PATTERNS,
    spectral_clamp: float | None = None,
    clamp_patterns: Iterable[str] = (),
    amplify: float = 1.0,
    amplify_targets: Iterable[str] = (),
    amplify_rank: int = 8,
    amplify_every: int = 10,
    stability_threshold: float = 0.9,
    stability_checks: int = 3,
    amplify_mode: str = "subspace",
    **optimizer_kwargs: Any,
):
    """Build a `DirectionalOptimizer` over `model`'s trainable parameters (see the module docstring).

    Args:
        model: the model (PeftModel, transformers model or any nn.Module); parameters are grouped by name.
            Called with no arguments at all this returns the factory itself: transformers' Trainer instantiates a
            factory with ``factory()`` before calling it with ``(model, **kwargs)``.
        args: a `transformers.TrainingArguments` (or anything with its attributes): `learning_rate` is the base lr,
            `weight_decay` the default group's decay, and `adam_beta1`/`adam_beta2`/`adam_epsilon` become
            ``betas``/``eps`` when `optimizer_cls` takes them. Explicit arguments win over it.
        lr: base learning rate (required unless `args` is given).
        optimizer_cls: a `torch.optim.Optimizer` subclass taking ``(param_groups, lr=..., **optimizer_kwargs)``.
        weight_decay: weight decay of the "default" group (default: ``args.weight_decay``, else 0).
        magnitude_lr_ratio: LR multiplier of the "magnitude" group (which has no weight decay); default 1 (off).
            A warning is issued when every trainable parameter lands in that group (e.g. SubspaceLoRA, whose only
            trainable tensors are its cores): the ratio then just rescales the whole adapter's LR.
        magnitude_patterns / no_decay_patterns: regexes (`re.search` on the parameter name) selecting the roles.
        spectral_clamp: c; keep every adapter branch's sigma_max(scaling * B @ A) <= c / sqrt(d_in) after each step.
        clamp_patterns: regexes of dense 2-D parameters clamped the same way (d_in = columns; rows for GPT-2 Conv1D).
        amplify: alpha >= 1; multiply the part of each step's update inside (or, in "bulk" mode, outside) the
            target's stable top-k momentum subspace pair by alpha.
        amplify_targets: regexes of the 2-D parameters to amplify; each must match at least one trainable 2-D param.
            With amplify=1 the trackers still run (for `amplifier_state()` logging, or an alpha=1 twin run).
        amplify_rank: k, the subspace rank (<= min dim of every target).
        amplify_every: update the trackers every N optimizer steps.
        stability_threshold / stability_checks: a target is stable after `stability_checks` consecutive checks with
            min(cos_u_mean, cos_v_mean) >= `stability_threshold`.
        amplify_mode: "subspace" or "bulk" (the ablation control).
        **optimizer_kwargs: passed to `optimizer_cls` (betas, eps, momentum, ...).
    """
    if model is None:
        if lr is None and args is None and not optimizer_kwargs:
            return create_directional_optimizer  # the Trainer's `factory()` instantiation step
        raise TypeError(f"{_FN}: model is required: pass the model whose parameters to optimise as the first argument")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{_FN}: model must be an nn.Module (parameters are grouped by name), got {type(model).__name__}; "
            "pass the model itself, not model.parameters() or a list of param groups"
        )
    if _is_deepspeed(model):
        raise RuntimeError(
            f"{_FN}: DeepSpeed is not supported: its engine steps the optimizer inside backward()/engine.step() on "
            "its own partitioned parameter copies, so the clamp and amplification hooks would see cleared gradients "
            "and the wrong tensors. Run without DeepSpeed (DDP works), or use a plain optimizer."
        )

    # ------------------------------------------------------------------ scalar validation
    if args is not None:
        lr, weight_decay, optimizer_kwargs = _from_training_args(args, lr, weight_decay, optimizer_cls, optimizer_kwargs)
    if lr is None:
        raise ValueError(
            f"{_FN}: lr is required, got lr=None; pass the Trainer's arguments (args=training_args) or the base "
            "learning rate, e.g. lr=1e-4"
        )
    if weight_decay is None:
        weight_decay = 0.0
    where = f"{_FN}: "
    lr = check_number(lr, "lr", gt=0, where=where, fix="pass the base learning rate, e.g. lr=1e-4")
    weight_decay = check_number(weight_decay, "weight_decay", ge=0, where=where, fix="use 0.0 for none")
    magnitude_lr_ratio = check_number(magnitude_lr_ratio, "magnitude_lr_ratio", gt=0, where=where,
                                      fix="use 1.0 to give magnitude parameters the base lr")
    if spectral_clamp is not None:
        spectral_clamp = check_number(spectral_clamp, "spectral_clamp", gt=0, where=where,
                                      fix="pass a positive c (bound c / sqrt(d_in)) or None")
    amplify = check_number(amplify, "amplify", ge=1, where=where, fix="use 1.0 for no amplification")
    if amplify_mode not in AMPLIFY_MODES:
        raise ValueError(f"{_FN}: amplify_mode must be one of {AMPLIFY_MODES}, got amplify_mode={amplify_mode!r}")
    amplify_rank = check_int(amplify_rank, "amplify_rank", ge=1, where=where,
                             fix="the subspace needs at least one direction")
    amplify_every = check_int(amplify_every, "amplify_every", ge=1, where=where, fix="e.g. amplify_every=10")
    stability_checks = check_int(stability_checks, "stability_checks", ge=1, where=where, fix="e.g. stability_checks=3")
    check_number(stability_threshold, "stability_threshold", gt=0, le=1, where=where, why="a mean principal cosine",
                 fix="e.g. 0.9")
    magnitude_patterns = _patterns(magnitude_patterns, "magnitude_patterns")
    no_decay_patterns = _patterns(no_decay_patterns, "no_decay_patterns")
    clamp_patterns = _patterns(clamp_patterns, "clamp_patterns")
    amplify_targets = _patterns(amplify_targets, "amplify_targets")
    if amplify > 1 and not amplify_targets:
        raise ValueError(
            f"{_FN}: amplify={amplify} needs amplify_targets (name patterns of the 2-D weights whose updates to "
            "amplify), got none; pass e.g. amplify_targets=['lora_B'] or set amplify=1.0"
        )
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"{_FN}: optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    for bad in ("params", "param_groups"):
        if bad in optimizer_kwargs:
            raise TypeError(f"{_FN}: do not pass {bad}=; the parameters are taken from model")

    # ------------------------------------------------------------------ roles
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"{_FN}: the model has no trainable parameters (every requires_grad is False); "
            "attach an adapter (get_peft_model) or unfreeze some parameters first"
        )
    owners = _owner_modules(model)
    names: dict[torch.Tensor, str] = {}
    roles: dict[torch.Tensor, str] = {}
    groups: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}
    for n, p in named:
        if p in names:  # tied parameters: once
            continue
        if _matches(n, magnitude_patterns):
            role = "magnitude"
        elif _matches(n, no_decay_patterns) or "Norm" in type(owners.get(id(p), model)).__name__:
            role = "no_decay"
        else:
            role = "default"
        names[p] = n
        roles[p] = role
        groups[role].append(p)
    settings = {
        "default": (lr, float(weight_decay)),
        "no_decay": (lr, 0.0),
        "magnitude": (lr * magnitude_lr_ratio, 0.0),
    }
    param_groups = [
        {"params": groups[r], "lr": settings[r][0], "weight_decay": settings[r][1], "role": r}
        for r in ROLES
        if groups[r]
    ]
    in_optimizer = {id(p) for p in names}
    if magnitude_lr_ratio != 1.0 and groups["magnitude"] and not groups["default"] and not groups["no_decay"]:
        warnings.warn(
            f"{_FN}: every trainable parameter ({len(groups['magnitude'])} tensors, e.g. "
            f"{names[groups['magnitude'][0]]}) matched magnitude_patterns, so magnitude_lr_ratio={magnitude_lr_ratio} "
            f"only rescales the whole model's LR to {lr * magnitude_lr_ratio:g}; set magnitude_lr_ratio=1.0 and choose "
            "lr directly (SubspaceLoRA trains nothing but its cores)",
            stacklevel=2,
        )

    # ------------------------------------------------------------------ amplify targets
    targets: dict[str, torch.Tensor] = {}
    for pat in amplify_targets:
        hits = [(n, p) for p, n in names.items() if re.search(pat, n)]
        hits2d = [(n, p) for n, p in hits if p.dim() == 2]
        if not hits2d:
            also = f" (it matches only non-2-D parameters {[n for n, _ in hits][:3]})" if hits else ""
            raise ValueError(
                f"{_FN}: amplify_targets pattern {pat!r} matches no trainable 2-D parameter{also}; patterns are "
                f"regexes searched in parameter names such as {[n for _, n in list(names.items())[:3]]}"
            )
        for n, p in hits2d:
            targets.setdefault(n, p)
    for n, p in targets.items():
        if amplify_rank > min(p.shape):
            raise ValueError(
                f"{_FN}: amplify_rank={amplify_rank} is larger than the smaller dimension of amplify target {n} "
                f"(shape {tuple(p.shape)}); choose amplify_rank <= {min(p.shape)} or exclude {n} from amplify_targets"
            )

    # ------------------------------------------------------------------ clamp targets
    branches: list[_Branch] = []
    dense: dict[str, tuple[torch.Tensor, int]] = {}
    if spectral_clamp is not None:
        branches = _find_branches(model, in_optimizer)
        for pat in clamp_patterns:
            hits = [(n, p) for p, n in names.items() if re.search(pat, n) and p.dim() == 2]
            if not hits:
                raise ValueError(f"{_FN}: clamp_patterns pattern {pat!r} matches no trainable 2-D parameter")
            for n, p in hits:
                conv1d = type(owners.get(id(p), model)).__name__ == "Conv1D"  # GPT-2 stores (in, out)
                dense.setdefault(n, (p, p.shape[0] if conv1d else p.shape[1]))
        if not branches and not dense:
            warnings.warn(
                f"{_FN}: spectral_clamp={spectral_clamp} is set but the model has no trainable adapter branch "
                "(PEFT LoRA or lora_factors layer) and clamp_patterns selects nothing: nothing will be clamped"
            )
    elif clamp_patterns:
        raise ValueError(f"{_FN}: clamp_patterns={list(clamp_patterns)} needs spectral_clamp (the constant c) to be set")

    cls = _directional_class(optimizer_cls)
    opt = cls(param_groups, lr=lr, **optimizer_kwargs)
    opt._setup_directional(
        names=names,
        roles=roles,
        amplify=amplify,
        amplify_mode=amplify_mode,
        amplify_targets=targets,
        amplify_rank=amplify_rank,
        amplify_every=amplify_every,
        stability_threshold=float(stability_threshold),
        stability_checks=stability_checks,
        spectral_clamp=spectral_clamp,
        branches=branches,
        dense_clamp=dense,
    )
    return opt
