"""Type checks of config fields that NullSpaceLoraConfig, SubspaceLoraConfig and OrthoSplitConfig share.

A config comes from code or from an adapter_config.json that anyone can edit, and `__post_init__` runs for both. A
wrong type there otherwise surfaces much later as a bare TypeError naming no field (`0.0 <= "0.1"`), or not at all
(a `modules_to_save="classifier"` string is iterated letter by letter). Each check raises one ValueError naming the
config class, the field, the value with its type, and the fix, as the configs' other checks do.
"""

from __future__ import annotations

from typing import Any

from ._checks import shown


def check_bool(config: Any, cls_name: str, field: str) -> None:
    value = getattr(config, field)
    if not isinstance(value, bool):
        raise ValueError(f"{cls_name}.{field} must be True or False, got {field}={shown(value)}")


def _is_str_list(value: object) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def check_shared_fields(config: Any, cls_name: str) -> None:
    """The target-selection fields every peft-ext config declares, and the PeftConfig fields a JSON file can set.

    Runs before `validate_target_fields` turns lists into sets. `target_modules=None` is left to that function,
    which says that the field is required.
    """
    for field in ("target_modules", "exclude_modules"):
        value = getattr(config, field)
        if value is not None and not (isinstance(value, str) or _is_str_list(value)):
            raise ValueError(
                f"{cls_name}.{field} must be a list of module names or one regex string, got {field}={shown(value)}; "
                "e.g. ['q_proj', 'v_proj'] or 'all-linear'"
            )
    value = config.modules_to_save
    if value is not None and not _is_str_list(value):
        fix = f"['{value}']" if isinstance(value, str) else "['classifier']"
        raise ValueError(
            f"{cls_name}.modules_to_save must be a list of module names, got modules_to_save={shown(value)}; "
            f"e.g. {fix}" + (" (a string would be read letter by letter)" if isinstance(value, str) else "")
        )
    value = config.layers_to_transform
    indices = [value] if not isinstance(value, (list, tuple)) else value
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(
            f"{cls_name}.layers_to_transform must be a layer index >= 0 or a list of them, got "
            f"layers_to_transform={shown(value)}; e.g. [0, 1, 2]"
        )
    value = config.layers_pattern
    if value is not None and not (isinstance(value, str) or _is_str_list(value)):
        raise ValueError(
            f"{cls_name}.layers_pattern must be the name of the layer list (a string or a list of them), got "
            f"layers_pattern={shown(value)}; e.g. 'layers' or 'h'"
        )
    for field in ("base_model_name_or_path", "revision"):
        value = getattr(config, field)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{cls_name}.{field} must be a string or None, got {field}={shown(value)}")
    check_bool(config, cls_name, "inference_mode")
