"""The one place that touches PEFT's method registry.

`peft.utils.peft_types.register_peft_method` accepts only names already in the closed `PeftType` enum, so a third
party must extend the enum first. Its prefix-collision check compares a prefix against the mapping's *keys* (peft
types), so it never fires: we check prefixes against the registered prefixes ourselves. Registration is idempotent:
importing `peft_ext` twice, or reloading a module, registers nothing new.
"""

from __future__ import annotations

import aenum
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType, register_peft_method

# Every PEFT type peft_ext defines, with the line a user needs when the type is unknown to a process.
OUR_PEFT_TYPES: dict[str, str] = {}


def ensure_peft_type(name: str) -> PeftType:
    """Return `PeftType.<NAME>`, extending PEFT's enum with it if this process has not done so yet."""
    upper = name.upper()
    if upper not in PeftType.__members__:
        aenum.extend_enum(PeftType, upper, upper)
    return PeftType[upper]


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register a PEFT method under `name` (lower case) with a prefix no other method uses.

    Re-registering the same classes is a no-op; registering other classes under a taken name or prefix raises.
    """
    existing = PeftType.__members__.get(name.upper())
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(existing) if existing is not None else None
    if registered is not None:
        peft_type = existing
        same = (
            registered.__qualname__ == model_cls.__qualname__
            and PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__qualname__ == config_cls.__qualname__
            and PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type) == prefix
        )
        if not same:
            raise KeyError(
                f"PEFT type {peft_type.value} is already registered with {registered.__module__}."
                f"{registered.__qualname__}; refusing to replace it with {model_cls.__module__}.{model_cls.__qualname__}."
            )
        # Same classes (e.g. after importlib.reload): point the mappings at the current objects.
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        return peft_type

    # Parts of PEFT still find adapter weights by substring (`prefix in name`), so a prefix that contains another
    # method's prefix, or is contained in one, would make them confuse the two methods.
    clashes = sorted(str(getattr(t, "value", t)) for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p in prefix or prefix in p)
    if clashes:
        raise KeyError(
            f"prefix {prefix!r} for {name} overlaps the prefix of {clashes}; choose a prefix that neither contains "
            "nor is contained in another method's prefix."
        )
    peft_type = ensure_peft_type(name)  # only now: a refused registration leaves PEFT's enum as it was
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    OUR_PEFT_TYPES[peft_type.value] = name
    return peft_type


def missing_type_hint(peft_type: str) -> str | None:
    """The message to show when `peft_type` is one of ours but this process does not know it."""
    if peft_type in OUR_PEFT_TYPES or peft_type.startswith(("NULLSPACE_", "ORTHO_", "SUBSPACE_")):
        return (
            f"The adapter has peft_type={peft_type!r}, which is a peft-ext method: run `import peft_ext` before "
            "loading it (pip install peft-ext), or load the plain LoRA written by `peft_ext.export_to_lora`."
        )
    return None
