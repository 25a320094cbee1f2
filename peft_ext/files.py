"""Writing result folders so that they appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False, field: str = "out_dir") -> Iterator[str]:
    """Yield a temporary directory beside `out_dir`; when the block succeeds it is renamed to `out_dir`, when it
    raises it is removed, so readers never see a half-written folder.

    An existing `out_dir` is refused unless `overwrite` (checked before the block runs, and again before the rename
    in case it appeared meanwhile); it is then swapped out by rename and deleted afterwards. The temporary directory
    gets the permissions a plain `os.makedirs` would give (mkdtemp's are owner-only), so the published folder is not
    private by accident.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{field}={out_dir!r} exists; pass overwrite=True or choose another directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if os.path.exists(out_dir):
            if not overwrite:
                raise FileExistsError(f"{field}={out_dir!r} appeared while writing; pass overwrite=True")
            old = tmp + ".old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
