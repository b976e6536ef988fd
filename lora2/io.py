"""Crash-safe writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, directory: bool) -> None:
    """mkstemp / mkdtemp make private (0600 / 0700) files; give results the usual permissions."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` in one rename.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _chmod_default(tmp, directory=False)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_dir(target: str | os.PathLike[str], fill: Callable[[Path], None]) -> None:
    """Build a whole directory with ``fill(tmp_dir)``, then swap it in for ``target``.

    Used for checkpoints: if writing fails half-way (disk full, killed), the previous ``target``
    survives intact and the half-written staging directory is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(staging)
        for f in staging.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                _chmod_default(f, directory=False)  # safetensors writes 0600: a shared model folder must be readable
        _chmod_default(staging, directory=True)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_dir(target: str | os.PathLike[str]) -> Path:
    """Finish a swap that ``atomic_write_dir`` was killed in the middle of.

    Between its two renames only ``.NAME.old`` exists; that is the previous complete version, so
    it is renamed back. Returns ``target``.
    """
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
    return target


LOCK_NAME = ".lora2.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a run or comparison folder) while lora2 writes it.

    A second lora2 process asking for the same folder gets a clear error instead of interleaving its
    log, adapter and checkpoints with the first one's. The lock is the kernel's (flock on
    ``.lora2.lock``): it goes with the process, however that ends, so a killed run never leaves a
    stale lock behind.
    """
    import fcntl
    import socket

    from .errors import InputError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise InputError(f"{folder} is in use by another lora2 process ({holder}): two runs writing one folder "
                             "would mix their logs, adapters and checkpoints. Wait for it to end or stop it, or "
                             "choose another output folder.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# Files at the top of every folder a lora2 command writes: a run (train_config.json), an adapter, an
# export or a merged model (lora2_method.json), a comparison (results.json, sweep.json).
LORA2_OUTPUT_MARKERS = ("train_config.json", "lora2_method.json", "results.json", "sweep.json")
# Everything `merge` and `export` write (a merged model: transformers' save_pretrained and the
# tokenizer's files). They replace their output folder as a whole, so --overwrite lets them replace
# only a folder holding lora2_method.json and nothing outside these names.
WHOLE_OUTPUT_ENTRIES = ("lora2_method.json", "adapter_config.json", "adapter_model.safetensors", "config.json",
                        "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                        "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                        "vocab.*", "merges.txt", "spiece.model", "sentencepiece*.model", "chat_template.*",
                        "rank_allocation.png", LOCK_NAME)


def check_output_folder(output: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str] | None],
                        overwrite: bool, flag: str = "--output", own: Callable[[Path], bool] | None = None,
                        whole: bool = True) -> None:
    """The output-folder policy of every lora2 command that writes a folder, checked before any work.

    Refused, whatever ``overwrite`` says: an output that is, contains or lies inside one of the
    ``inputs`` (role → path), since writing it would destroy the input; a file; a non-empty folder
    lora2 did not write (lora2 never deletes files it did not write). ``whole`` (merge, export: the
    folder is replaced as a whole) makes that strict: every entry must be one such a command writes.
    Refused unless ``overwrite``: any other non-empty folder (another lora2 output) that ``own``
    does not accept as this command's own (the same run started again, a comparison continued).
    """
    from fnmatch import fnmatch

    from .errors import InputError

    out = Path(output).expanduser().resolve()
    for role, path in inputs.items():
        if path is None:
            continue
        src = Path(path).expanduser().resolve()
        relation = ("is" if out == src else "contains" if src.is_relative_to(out)
                    else "lies inside" if out.is_relative_to(src) else None)
        if relation:
            raise InputError(f"{flag} {output} {relation} the {role} {path}: writing there would destroy it. "
                             f"Choose a folder outside it, e.g. {Path(path).expanduser().parent / (out.name + '-out')}.")
    if out.is_file():
        raise InputError(f"{flag} {output} is a file, not a folder; choose a folder.")
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if not held or (own is not None and own(out)):
        return
    foreign = held if not any((out / marker).is_file() for marker in LORA2_OUTPUT_MARKERS) else \
        [name for name in held if whole and not any(fnmatch(name, pattern) for pattern in WHOLE_OUTPUT_ENTRIES)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (" …" if len(foreign) > 4 else "")
        if whole:
            raise InputError(f"{flag} {output} holds files this command does not write ({shown}): replacing the "
                             "folder would delete them. lora2 replaces only a folder that holds nothing but an earlier "
                             "output of the same kind, with or without --overwrite: choose a new folder.")
        raise InputError(f"{flag} {output} holds files lora2 did not write ({shown}) and no lora2 output; lora2 does "
                         "not write among someone's files, with or without --overwrite: choose a new folder.")
    if not overwrite:
        raise InputError(f"{flag} {output} holds another lora2 output (another run, model or export); lora2 refuses "
                         "to write over it. Choose a new folder, or pass --overwrite to replace it.")
