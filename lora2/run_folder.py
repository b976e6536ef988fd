"""A run folder's rules, in one place: what each lora2 command may write or replace, the lock, the
fingerprints of what a run read, its checkpoints, and how it records its paths.

What each command writes, and what it may replace:

    command          writes                               replaces (--overwrite)          refuses, always
    train            RUN/: train_config.json, log.jsonl,  another run's files in RUN      an input (model, data) or a folder
                     result.json, adapter/, best/,        (only RUN_FILES are removed;    holding one; a folder of files lora2
                     checkpoint/                          --resume: its own run)          did not write; a run's own adapter/,
                                                                                          best/ or checkpoint/
    merge, export    OUTPUT/ as a whole                   an earlier merge or export      the same, and any folder holding a
                                                                                          file merge / export do not write
    compare          OUTPUT/: results.*, sweep.json,      another lora2 output            the same as train
                     plots, runs/TASK/METHOD/lr/seed      (its own: continued)

Every folder is written whole or not at all (``io.atomic_write_dir``); a full disk leaves the previous
version in place and says so in one line. A run records its model and data paths absolute, so it resumes
from any working folder, and it records fingerprints of them (``input_fingerprints``): a resume refuses a
base model or a data file that changed. ``train --resume`` of a finished run changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .io import atomic_write_dir, recover_dir

CONFIG_FILE = "train_config.json"
RESULT_FILE = "result.json"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
LOCK_NAME = ".lora2.lock"
# What a run writes into its folder: a fresh start (of this run again, or over another one with
# --overwrite) clears exactly these, and never anything else in the folder.
RUN_FILES = (CONFIG_FILE, "log.jsonl", RESULT_FILE, "diverged.txt", "adapter", "best", CHECKPOINT_DIR,
             f".{CHECKPOINT_DIR}.old", ".adapter.old", ".best.old")
# The folders of a run that hold what it trained: no other command may write into them.
RUN_MEMBERS = {"adapter": "final adapter", "best": "best adapter", CHECKPOINT_DIR: "resumable checkpoint"}
# Files at the top of every folder a lora2 command writes: a run, an adapter, an export or a merged
# model (lora2_method.json), a comparison (results.json, sweep.json).
LORA2_OUTPUT_MARKERS = (CONFIG_FILE, "lora2_method.json", "results.json", "sweep.json", "train_sweep.json")
# Everything `merge` and `export` write (a merged model: transformers' save_pretrained and the
# tokenizer's files). They replace their output folder as a whole, so --overwrite lets them replace
# only a folder holding lora2_method.json and nothing outside these names.
WHOLE_OUTPUT_ENTRIES = ("lora2_method.json", "adapter_config.json", "adapter_model.safetensors", "config.json",
                        "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                        "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                        "vocab.*", "merges.txt", "spiece.model", "sentencepiece*.model", "chat_template.*",
                        "rank_allocation.png", LOCK_NAME)
# The paths a run's settings hold; recorded absolute (see absolute_paths)
PATH_FIELDS = ("model", "train_file", "validation_file", "test_file")


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


# --- paths -----------------------------------------------------------------------------------------------


def normalised(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``~`` expanded and ``a/../b`` collapsed, still relative if it was: what lora2 writes to
    and prints (``rr/../rr`` is the folder ``rr``; ``rr/..`` is ``.``, never a folder named ``..``)."""
    return Path(os.path.normpath(Path(path).expanduser()))


def absolute_paths(cfg: Any) -> Any:
    """``cfg`` (a TrainConfig) with its model and data paths absolute, as a run records them: resumed from
    another working folder, or copied next to another model of the same name, it reads what it started
    with. The model name ``minilm`` (a package) stays a name."""
    changes = {name: os.path.abspath(Path(value).expanduser()) for name in PATH_FIELDS
               if isinstance(value := getattr(cfg, name), str) and not (name == "model" and value == "minilm")}
    return dataclasses.replace(cfg, **changes)


def read_run_config(folder: str | os.PathLike[str], config_class: type) -> Any:
    """The settings of the run in ``folder``, to resume it there: the folder given is the run (a copied or
    moved run folder resumes and writes where it is now, never where it was first started)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --resume needs the output folder of an earlier lora2 train run.")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        cfg = config_class(**saved)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path} is not a lora2 run's settings ({e}); it cannot be resumed.") from e
    # runs recorded before lora2 0.2.1 hold paths relative to the folder they were started from
    return dataclasses.replace(absolute_paths(cfg), output_dir=str(normalised(folder)))


def records_config(folder: str | os.PathLike[str], cfg: Any) -> bool:
    """Whether ``folder`` holds a run started with exactly ``cfg``'s settings (paths compared absolute; the
    output folder is the one asked about). False if it holds none or an unreadable one."""
    try:
        saved = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
        saved_cfg = absolute_paths(type(cfg)(**saved))
    except (OSError, ValueError, TypeError):
        return False
    mine = json.loads(json.dumps(dataclasses.asdict(absolute_paths(cfg))))
    theirs = json.loads(json.dumps(dataclasses.asdict(saved_cfg)))
    return {**mine, "output_dir": None} == {**theirs, "output_dir": None}


def finished_result(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The result.json of a run that finished in ``folder``, or None."""
    try:
        return json.loads((Path(folder) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- what a command may write ------------------------------------------------------------------------------


def enclosing_run(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(run folder, member) when ``path`` is, or lies inside, the adapter/, best/ or checkpoint/ folder of a
    lora2 train run (a folder holding train_config.json); else None."""
    path = Path(path).expanduser().resolve()
    for member_path in (path, *path.parents):
        run = member_path.parent
        if member_path.name in RUN_MEMBERS and (run / CONFIG_FILE).is_file():
            return run, member_path.name
    return None


def check_output_folder(output: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str] | None],
                        overwrite: bool, flag: str = "--output", own: Callable[[Path], bool] | None = None,
                        whole: bool = True) -> None:
    """The output-folder policy of every lora2 command that writes a folder, checked before any work.

    Refused, whatever ``overwrite`` says: an output that is, contains or lies inside one of the ``inputs``
    (role → path), since writing it would destroy the input; a run's own adapter/, best/ or checkpoint/
    (``enclosing_run``); a file; a non-empty folder lora2 did not write (lora2 never deletes files it did
    not write). ``whole`` (merge, export: the folder is replaced as a whole) makes that strict: every entry
    must be one such a command writes. Refused unless ``overwrite``: any other non-empty folder (another
    lora2 output) that ``own`` does not accept as this command's own (the same run started again, a
    comparison continued).
    """
    from fnmatch import fnmatch

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
    run = enclosing_run(out)
    if run is not None:
        folder, member = run
        raise InputError(f"{flag} {output} {'is' if out == folder / member else 'lies inside'} the {member}/ folder "
                         f"of the run in {folder}: it holds the run's {RUN_MEMBERS[member]}, which lora2 never "
                         "replaces with another command's output (with or without --overwrite). Choose a folder "
                         f"outside it, e.g. {folder / (member + '-' + out.name if out.name != member else 'out')}.")
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


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a run or comparison folder) while lora2 writes it.

    A second lora2 process asking for the same folder gets a clear error instead of interleaving its
    log, adapter and checkpoints with the first one's. The lock is the kernel's (flock on
    ``.lora2.lock``): it goes with the process, however that ends, so a killed run never leaves a
    stale lock behind. A folder made only to hold the lock (a command refused, or stopped, before it
    wrote anything) is removed again.
    """
    import fcntl
    import socket

    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PermissionError(e.errno, f"output folder {folder} is not writable ({e.strerror}); choose another "
                                       "--output-dir.") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            created = []  # the other process's folder
            raise InputError(f"{folder} is in use by another lora2 process ({holder}): two runs writing one folder "
                             "would mix their logs, adapters and checkpoints. Wait for it to end or stop it, or "
                             "choose another output folder.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                (folder / LOCK_NAME).unlink()
                for made in created:  # innermost first; stops at the first that is not empty
                    made.rmdir()
        os.close(fd)  # releases the lock


def claim_output_dir(out: Path, cfg: Any, inputs: dict[str, str | None], resume: bool, overwrite: bool,
                     stack: contextlib.ExitStack) -> None:
    """Lock the run folder for this process, then apply the output-folder policy (``check_output_folder``):
    never an input's folder; a non-empty folder only if it is this run's own (``--resume``, or a start with
    the very settings it records) or with ``overwrite``."""
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{out / CONFIG_FILE} not found: --resume needs the output folder of an earlier "
                                    "lora2 train run.")
        stack.enter_context(folder_lock(out))
        return
    check_output_folder(out, inputs, overwrite, flag="--output-dir", own=lambda folder: records_config(folder, cfg),
                        whole=False)  # before the lock makes the folder: an input must not get one
    stack.enter_context(folder_lock(out))
    check_output_folder(out, inputs, overwrite, flag="--output-dir", own=lambda folder: records_config(folder, cfg),
                        whole=False)  # again, now that no other lora2 process can change it
    stopped = (out / CHECKPOINT_DIR / STATE_FILE).is_file() and not (out / RESULT_FILE).is_file()
    if stopped and not overwrite:
        raise InputError(f"{out} holds a run that was stopped before its end, with a checkpoint: "
                         f"`lora2 train --resume {out}` continues it; --overwrite starts over and deletes it.")


def clear_run_files(out: Path) -> None:
    """A fresh start in a folder ``claim_output_dir`` accepted: nothing of an earlier run may mix into this
    one. Only RUN_FILES go, and a symbolic link among them goes as a link (what it points to is never
    touched). Everything is checked before anything is deleted, so a failure leaves the earlier run whole."""
    doomed = [out / name for name in RUN_FILES if (out / name).is_symlink() or (out / name).exists()]
    for path in doomed:
        if not path.is_symlink() and path.is_dir():
            for parent, dirs, files in os.walk(path):
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise PermissionError(f"cannot clear the earlier run's {Path(parent)} (not writable); nothing "
                                          "was deleted. Fix its permissions or choose another --output-dir.")
    for path in doomed:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)


# --- fingerprints of what a run read -----------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_model_fingerprint(model_path: str) -> str:
    """A SHA-256 over the base model folder's config.json and, for each weight file, its name, size and 16
    samples of 64 KiB spread over it (1 MiB a file, whatever the model's size: a 70B model fingerprints as fast
    as MiniLM). Another model of the same architecture (a fine-tune, another seed) differs in every sample."""
    folder = Path(model_path)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json"
                                                                       or p.name.endswith(WEIGHT_SUFFIXES))):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.name == "config.json" or size <= _SAMPLES * _SAMPLE_BYTES:
                digest.update(f.read())
                continue
            for i in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def input_fingerprints(data_files: dict[str, str | None], model_path: str) -> dict[str, str]:
    """{role: fingerprint} of everything a run reads: SHA-256 of each data file, and the base model's."""
    prints = {role: _sha256(Path(path)) for role, path in data_files.items() if path}
    prints["base model"] = base_model_fingerprint(model_path)
    return prints


def check_same_inputs(saved: dict[str, str] | None, now: dict[str, str], out: Path) -> None:
    """A resume reads what the run started with, or is refused."""
    changed = [role for role in now if saved is not None and saved.get(role) not in (None, now[role])]
    if changed:
        raise CheckpointError(f"the {' and '.join(changed)} changed since the run in {out} started (the fingerprint "
                              "differs): resuming would train one run on two. Restore "
                              f"{'it' if len(changed) == 1 else 'them'}, or start a new run (another --output-dir).")


# --- checkpoints -------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, so a checkpoint loads with weights_only=True."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                       "has_gauss": has_gauss, "cached_gaussian": cached_gaussian}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_whole(target: Path, fill: Callable[[Path], None], what: str, resume_hint: str, kind: str = "one") -> None:
    """``io.atomic_write_dir`` with a failure (a full disk, permissions; safetensors raises its own error for
    these) said in one line: what could not be written, that the previous ``kind`` is intact, what to do."""
    from safetensors import SafetensorError

    try:
        atomic_write_dir(target, fill)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or (re.search(r'message: "([^"]+)"', str(e)) or [None, str(e)])[1]
        previous = f"the previous {kind} in {target} is intact" if target.exists() else f"no earlier {kind} exists"
        message = f"could not write {what} to {target} ({reason}); {previous}. Free space or fix permissions, then " \
                  f"{resume_hint}."
        error = OSError(message)
        error.errno = getattr(e, "errno", None)  # kept for callers, out of the message ("[Errno 28] ...")
        raise error from e


def save_checkpoint(path: Path, method: Any, optimizer, scheduler, scaler, state: dict[str, Any], run: Path) -> None:
    payload = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "method": method.state_dict(), "rng": rng_state(), "state": state,
    }

    def fill(tmp: Path) -> None:
        method.save(tmp / "adapter")
        torch.save(payload, tmp / STATE_FILE)

    write_whole(path, fill, f"the step-{state['step']} checkpoint", f"resume with `lora2 train --resume {run}`",
                "checkpoint")


def load_checkpoint(path: Path, method: Any, optimizer, scheduler, scaler) -> dict[str, Any]:
    recover_dir(path)  # a kill between the two renames of the last save leaves only .checkpoint.old
    if not (path / STATE_FILE).is_file():
        run = path.parent
        raise CheckpointError(f"no checkpoint to resume from in {path} (the run stopped before its first "
                              "evaluation wrote one, or it was removed): start the run over with its settings and "
                              f"--output-dir {run} --overwrite (that replaces its files).")
    # weights_only: unpickling arbitrary objects runs whatever code a crafted checkpoint carries.
    # Everything lora2 writes is tensors and plain Python values.
    try:
        payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it refers to {found.group(1)}" if found else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path / STATE_FILE} holds objects other than tensors and plain data ({reason}). lora2 loads "
            "checkpoints with torch.load(weights_only=True) because unpickling other objects can run arbitrary "
            "code; it writes nothing else itself, so this file was not written by this lora2 version (or was "
            "tampered with). Start the run again without --resume.") from None
    method.load(path / "adapter")
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    method.load_state_dict(payload["method"])
    set_rng_state(payload["rng"])
    return payload["state"]
