"""peft-ext: PEFT methods that control what a fine-tune changes.

Importing this package registers its PEFT types with `peft` (idempotently), so `get_peft_model` and
`PeftModel.from_pretrained` work with them.

One exception: in the process of the `peft-ext` command itself, the API (torch, peft, transformers: seconds to import)
is imported only when a command runs (`peft_ext.cli.main` calls `_ensure_api()`), so that `--help`, `--version` and
usage errors answer at once.
"""

import os
import re
import sys


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-ext")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"


__version__ = _version()


def _in_cli_process() -> bool:
    """True when `__main__` is the `peft-ext` script that pip (or uv) writes: `from peft_ext.cli import main`."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    return re.sub(r"(-script\.pyw?|\.exe)$", "", os.path.basename(script)) == "peft-ext"


def _ensure_api() -> None:
    """Import the public API into this package and register our PEFT types (what `import peft_ext` does)."""
    from . import _api

    globals().update({name: getattr(_api, name) for name in _api.__all__}, __all__=_api.__all__)
    _api.register_types()


if not _in_cli_process():
    from ._api import *  # noqa: F403 (the public API: see _api.__all__)
    from ._api import __all__, register_types

    register_types()
