"""atomic_directory: complete or absent, never half-written, and not private by accident."""

import os
import stat

import pytest

from peft_ext.files import atomic_directory


def test_success_renames_into_place_with_default_permissions(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_directory(out) as tmp:
        assert not out.exists() and os.path.dirname(tmp) == str(out.parent)
        (open(os.path.join(tmp, "a.txt"), "w")).write("x")
    assert (out / "a.txt").read_text() == "x" and os.listdir(out.parent) == ["out"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~mask  # mkdtemp alone would give 0o700


def test_failure_leaves_nothing_and_existing_output_is_kept_or_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"out_dir=.*exists; pass overwrite=True"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True):
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old" and os.listdir(tmp_path) == ["out"]
    with atomic_directory(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
