"""Writing output folders and files so that they appear complete or not at all.

peft-ext's writers go through the helpers here:

- `atomic_directory(out_dir)`: a block writes into a hidden temporary folder beside `out_dir`; on success the files
  are fsynced and the folder takes `out_dir`'s place by rename, so readers (and a process killed at any instant) see
  the complete old folder or the complete new one, never a mix.
- `save_adapter_atomic(model, out_dir, **kwargs)`: `PeftModel.save_pretrained` through `atomic_directory`, leaving
  what an in-place `save_pretrained` would have left (files it does not write are kept), reached in one step.
- `atomic_file(path)`: the same for one file.

Temporary names are `.<name>.tmp-<pid>-<host>-<random>`, so the next write to the same destination can tell a
leftover of a killed process (pid no longer running on this host: removed) from another live writer's work (kept).
Outputs get the permissions a plain `os.makedirs`/`open` would give (the umask's), never mkdtemp's owner-only ones;
a folder or file that replaces an existing one keeps that one's permissions, as writing in place would.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

# A temporary whose owner cannot be checked (another machine on a shared filesystem, or a name written by a
# peft-ext before pids were recorded) is removed once it is this old: no single write takes a day.
STALE_AFTER_S = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(dest: str) -> str:
    return f".{os.path.basename(dest)}.tmp-{os.getpid()}-{_HOST}-"


def _temp_pattern(dest: str) -> re.Pattern:
    # pid and host are absent in the names older peft-ext versions wrote (".<name>.tmp-<random>[.old]")
    return re.compile(rf"\.{re.escape(os.path.basename(dest))}\.tmp-(?:(\d+)-([A-Za-z0-9]+)-)?([a-z0-9_]{{8}})(\.old)?")


def _owner_alive(pid: str | None, host: str | None, path: str) -> bool:
    if pid is not None and host == _HOST and os.name == "posix":  # on Windows os.kill(pid, 0) would kill it
        if int(pid) == os.getpid():
            return True  # another thread of this process may be writing it
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except OSError:  # exists, owned by another user
            return True
        return True
    try:
        return time.time() - os.lstat(path).st_mtime < STALE_AFTER_S
    except FileNotFoundError:
        return True  # already gone


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_temporaries(dest: str | os.PathLike) -> list[str]:
    """Remove the temporaries that interrupted writes of `dest` left beside it (their process is gone); return them.

    Called by every write here before it starts. If a write was killed between the two renames of the fallback swap
    (filesystems without an atomic exchange), `dest` is missing and its complete new version is put in place first.
    """
    dest = os.path.abspath(os.fspath(dest))
    parent = os.path.dirname(dest)
    pattern = _temp_pattern(dest)
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    dead = []
    for name in sorted(n for n in names if n.startswith(".")):  # cheap in a cache folder of many entries
        m = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        # a temporary that is a symbolic link is nobody's work in progress: older versions left the swapped-out
        # link of a symlinked out_dir behind as ".<link>.tmp-*.old"
        if m and (os.path.islink(path) or not _owner_alive(m.group(1), m.group(2), path)):
            dead.append((path, m.group(4) is not None))
    if not os.path.lexists(dest):
        for path, is_old in dead:
            new = path[: -len(".old")]
            # killed between the two renames: `dest` went to .old only once its successor was complete and fsynced
            if is_old and os.path.isdir(new) and not os.path.islink(new):
                os.rename(new, dest)
                break
    removed = []
    for path, _ in dead:
        if os.path.lexists(path):
            _remove(path)
            removed.append(path)
    return removed


def _fsync(path: str, directory: bool) -> None:
    if directory and os.name == "nt":
        return  # Windows cannot open a directory for fsync
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise  # some filesystems do not fsync directories; file data must reach the disk
    finally:
        os.close(fd)


def _fsync_tree(root: str, files: bool = True) -> None:
    for here, dirs, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = os.path.join(here, name)
                if stat.S_ISREG(os.lstat(path).st_mode):
                    _fsync(path, False)
        _fsync(here, True)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2: Any = None


def _rename2(src: str, dst: str, flags: int) -> bool:
    """Linux renameat2: True if done, False if this system or filesystem lacks it; raises its other errors."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel, or a filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)  # instant, and costs no space
    except OSError:  # filesystems without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: str, new: str, keep: Callable[[str, str], bool] | None) -> None:
    """Put into `new` every entry of `old` that `new` lacks and `keep(new, relative path)` accepts (hard links,
    recursively), and give what `new` replaces the permissions of what it replaces: the folder then holds what
    writing `new`'s files in place would have left."""
    for here, dirs, names in os.walk(old):
        target = os.path.normpath(os.path.join(new, os.path.relpath(here, old)))
        for name in list(dirs) + names:
            src, dst = os.path.join(here, name), os.path.join(target, name)
            src_st = os.lstat(src)
            if not os.path.lexists(dst) and keep is not None and not keep(new, os.path.relpath(src, old)):
                if name in dirs:
                    dirs.remove(name)
                continue
            if os.path.lexists(dst):
                dst_st = os.lstat(dst)
                if stat.S_IFMT(dst_st.st_mode) == stat.S_IFMT(src_st.st_mode) and not stat.S_ISLNK(src_st.st_mode):
                    os.chmod(dst, stat.S_IMODE(src_st.st_mode))
                if name in dirs and not (stat.S_ISDIR(dst_st.st_mode) and not os.path.islink(dst)):
                    dirs.remove(name)  # the new write put a file where the old had a folder: the new one wins
            elif stat.S_ISLNK(src_st.st_mode):
                os.symlink(os.readlink(src), dst)  # os.walk lists links to folders in `dirs` but does not enter them
            elif stat.S_ISDIR(src_st.st_mode):
                os.mkdir(dst)
                os.chmod(dst, stat.S_IMODE(src_st.st_mode))
            else:
                _link_or_copy(src, dst)


def _holds_cwd(path: str) -> bool:
    try:
        cwd = os.path.realpath(os.getcwd())
    except FileNotFoundError:
        return False
    return cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep)


def _resolve(out_dir: str | os.PathLike, field: str, *, want_dir: bool) -> tuple[str, str]:
    """(absolute path as given, real path written): a symbolic link keeps pointing at the same place, which gets
    the new content, so links such as `latest -> run-7` keep working and their target is what is swapped."""
    shown = os.path.abspath(os.fspath(out_dir))
    real = os.path.realpath(shown)
    if real == os.path.dirname(real):
        raise ValueError(f"{field}={shown!r} is the filesystem root; pass a folder below it")
    if os.path.lexists(real):
        if want_dir and not os.path.isdir(real):
            raise ValueError(f"{field}={shown!r} is a file, not a folder; pass a folder path")
        if not want_dir and os.path.isdir(real):
            raise ValueError(f"{field}={shown!r} is a folder, not a file; pass a file path")
    elif real != shown and not os.path.isdir(os.path.dirname(real)):
        raise ValueError(f"{field}={shown!r} is a symbolic link to {real!r}, whose folder does not exist; create "
                         "that folder or point the link elsewhere")
    if want_dir and os.path.isdir(real) and _holds_cwd(real):
        raise ValueError(f"{field}={shown!r} is (or holds) the current working directory, which replacing it would "
                         f"leave deleted under this process; write into a sub-folder such as {shown}/adapter")
    return shown, real


def _publish(tmp: str, dest: str, shown: str, field: str, overwrite: bool, merge: bool,
             keep: Callable[[str, str], bool] | None) -> None:
    parent = os.path.dirname(dest)
    _fsync_tree(tmp)
    if not os.path.lexists(dest):
        try:
            done = _rename2(tmp, dest, _RENAME_NOREPLACE)
        except FileExistsError:
            done = False  # appeared meanwhile: handled below as an existing folder
        if not done and not os.path.lexists(dest):
            os.rename(tmp, dest)
            done = True
        if done:
            _fsync(parent, True)
            return
    if not overwrite:
        raise FileExistsError(f"{field}={shown!r} appeared while writing; pass overwrite=True or choose another folder")
    os.chmod(tmp, stat.S_IMODE(os.stat(dest).st_mode))  # a folder made private stays private
    if merge:
        _carry_over(dest, tmp, keep)
    _fsync_tree(tmp, files=False)
    if _rename2(tmp, dest, _RENAME_EXCHANGE):  # one step: `dest` is never missing; tmp now holds the old folder
        _fsync(parent, True)
        _remove(tmp)
        return
    old = tmp + ".old"  # without an exchange, `dest` is missing between two renames; clean_stale_temporaries repairs it
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _fsync(parent, True)
    _remove(old)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False, field: str = "out_dir",
                     merge: bool = False, keep: Callable[[str, str], bool] | None = None,
                     copy_in: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temporary folder beside `out_dir`; when the block succeeds its files and folders are fsynced and it
    takes `out_dir`'s place (one atomic exchange on Linux), when it raises it is removed. At every instant `out_dir`
    is the complete old folder or the complete new one, also when the process is killed.

    An existing `out_dir` is refused unless `overwrite` (checked before the block and again before the rename). It
    is then replaced as a whole, or with `merge=True` the entries of the old folder that the block did not write are
    kept (hard links, so this costs no copy): what writing in place would leave; `keep(temporary folder, relative
    path)`, if given, decides which of them are kept. `copy_in`: names of files of the existing folder copied (not
    linked) into the temporary folder before the block, for writers that update a file rather than write it afresh.

    A symbolic link `out_dir` keeps pointing where it did; the folder it points to is what is replaced. `out_dir`
    holding the working directory is refused (the process would be left in a deleted folder). Temporaries of
    earlier writes to `out_dir` whose process is gone are removed first.
    """
    shown, dest = _resolve(out_dir, field, want_dir=True)
    if os.path.exists(dest) and not overwrite:
        raise FileExistsError(f"{field}={shown!r} exists; pass overwrite=True or choose another folder")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temporaries(dest)
    if shown != dest:
        clean_stale_temporaries(shown)  # older versions wrote their temporaries beside the link itself
    tmp = tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(dest))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 would make the published folder private by accident
        for name in copy_in:
            if os.path.isfile(os.path.join(dest, name)):  # a copy: a link would let the block edit the old folder
                shutil.copy2(os.path.join(dest, name), os.path.join(tmp, name))
        yield tmp
        _publish(tmp, dest, shown, field, overwrite, merge, keep)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, field: str = "path") -> Iterator[str]:
    """Yield a temporary file path beside `path`; when the block succeeds the file is fsynced and renamed onto
    `path` (it keeps the permissions of the file it replaces, else the umask's), when it raises it is removed.
    A symbolic link `path` keeps pointing where it did, and its target is replaced."""
    shown, dest = _resolve(path, field, want_dir=False)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temporaries(dest)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=_temp_prefix(dest), suffix="")
    os.close(fd)
    try:
        yield tmp
        mode = stat.S_IMODE(os.stat(dest).st_mode) if os.path.exists(dest) else 0o666 & ~_umask()
        os.chmod(tmp, mode)  # mkstemp's are 0o600
        _fsync(tmp, False)
        os.replace(tmp, dest)
        _fsync(parent, True)
    except BaseException:
        _remove(tmp)
        raise


_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _not_superseded(new: str, rel: str) -> bool:
    # PEFT loads adapter_model.safetensors whenever it exists: left beside a newly saved adapter_model.bin it would
    # silently bring the old weights back, so a folder the save wrote an adapter into keeps no old weights
    folder, name = os.path.split(rel)
    return not (name in _ADAPTER_WEIGHTS and os.path.isfile(os.path.join(new, folder, "adapter_config.json")))


# How a PEFT save merges into an existing folder: other files kept, old weights of a re-saved adapter dropped, and
# the model card (README.md), which PEFT updates rather than rewrites, copied in first.
ADAPTER_MERGE = dict(merge=True, keep=_not_superseded, copy_in=("README.md",))


def save_adapter_atomic(model: Any, out_dir: str | os.PathLike, **save_pretrained_kwargs: Any) -> str:
    """`model.save_pretrained(out_dir, **save_pretrained_kwargs)` for any `peft.PeftModel`, complete or absent.

    PEFT writes in place: a process killed while it saves over an existing adapter leaves the old config with part
    of the new weights, and the old adapter is gone. This writes everything (non-default adapters go to sub-folders,
    as PEFT does) into a temporary folder beside `out_dir`, fsyncs it and swaps it in, so `out_dir` holds the
    complete old adapter or the complete new one at every instant. Files in an existing `out_dir` that the save does
    not write (your notes, other adapters' sub-folders, a Trainer's checkpoints) are kept, and an existing README.md
    is updated as PEFT updates it: the result is what an uninterrupted in-place `save_pretrained` would leave, except
    that a re-saved adapter keeps no weights file of the old format (in place, an old adapter_model.safetensors
    beside a new adapter_model.bin is what PEFT would load). A symbolic link `out_dir` keeps pointing where it did
    and its target is replaced. Returns the absolute `out_dir`.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"model is a {type(model).__name__}, not a peft.PeftModel; wrap the base model with "
                        "peft.get_peft_model(base, config) or load an adapter with PeftModel.from_pretrained")
    if "save_directory" in save_pretrained_kwargs:
        raise TypeError("save_adapter_atomic() got save_directory as a keyword; pass the folder as out_dir")
    shown = os.path.abspath(os.fspath(out_dir))
    if not save_pretrained_kwargs.get("is_main_process", True):
        # other ranks write nothing, but must make the same call (it may gather sharded weights)
        model.save_pretrained(shown, **save_pretrained_kwargs)
        return shown
    with atomic_directory(shown, overwrite=True, **ADAPTER_MERGE) as tmp:
        model.save_pretrained(tmp, **save_pretrained_kwargs)
    return shown


__all__ = ["ADAPTER_MERGE", "STALE_AFTER_S", "atomic_directory", "atomic_file", "clean_stale_temporaries",
           "save_adapter_atomic"]
