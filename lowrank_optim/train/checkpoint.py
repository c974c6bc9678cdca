"""Checkpoints of a training run: one file, ``DIR/checkpoint.pt``, replaced atomically.

A checkpoint holds everything the next step depends on, as tensors and plain values only (it loads
with ``torch.load(weights_only=True)``):

* ``model``: the model's ``state_dict()``;
* ``optimizer`` and ``scheduler``: their ``state_dict()`` (our optimizers keep projector state as
  tensors, so GaLore's bases and APOLLO's seeds resume exactly);
* ``step`` (optimizer steps taken) and ``position`` (global training sequences consumed);
* ``rng``: torch's CPU generator (and CUDA's, per device, when present), Python's ``random`` and
  NumPy's global generator;
* ``run``: the settings that define the trajectory (config, optimizer and its options, data, seed,
  batch and sequence sizes, schedule, dtype, world size), compared field by field on ``--resume``;
* ``format`` and ``version``, to refuse files that are not ours;
* ``digest``: SHA-256 digests of every tensor and of the whole tree (:mod:`.integrity`), checked on
  ``--resume``, so a flipped bit is refused naming the tensor (version 1 files, written before digests,
  still load, unchecked).

Saving writes a temporary file in the same folder (``.checkpoint.pt.<random>.tmp``), flushes and
fsyncs it, then ``os.replace``-s it over ``checkpoint.pt``: a reader sees the old file or the new
one, never a partial one, and a save that fails (full disk, an exception midway) removes its
temporary file and leaves the existing checkpoint as it was. A write that fails inside ``torch.save``
(which reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos``)
is raised as the OSError the file gave, so the caller can say "No space left on device".

Under ``--fsdp`` the checkpoint is a folder, ``DIR/checkpoint.dcp/``, written by
``torch.distributed.checkpoint`` from every rank: ``model`` and ``optim`` (``get_model_state_dict`` /
``get_optimizer_state_dict``, each rank writing its own rows, ``__<rank>_0.distcp`` and
``.metadata``), plus ``meta.pt`` from rank 0 with everything else above (``step``, ``position``,
``scheduler``, ``rng``, ``run``, ``format``, ``version``, ``digest``) and ``files``: the size and SHA-256
of every file of the folder, checked before torch reads any of them. Every rank writes into a temporary folder
``.checkpoint.dcp.<step>.tmp``; after a barrier rank 0 moves the previous folder aside
(``.checkpoint.dcp.old``), renames the new one into place and deletes the old one
(:func:`replace_dir`). A reader (:func:`dcp_path`) takes the aside copy if a crash left no
``checkpoint.dcp``, so there is always one complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import integrity
from .errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
#: The folder of an ``--fsdp`` run's distributed checkpoint, and its rank-0 file of everything else.
DCP_NAME = "checkpoint.dcp"
DCP_META = "meta.pt"
FORMAT = "lowrank-optim pretrain checkpoint"
DCP_FORMAT = "lowrank-optim pretrain checkpoint (FSDP2, torch.distributed.checkpoint)"
VERSION = 2
#: Versions this lowrank-optim reads: 1 (no digests) and 2.
READS = (1, 2)


def rng_state() -> dict[str, Any]:
    """Every global random generator's state, as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def restore_rng(state: Any, where: str | os.PathLike[str]) -> None:
    """:func:`set_rng_state` from a checkpoint; a state that does not load is a CheckpointError, and the
    generators are left as they were."""
    before = rng_state()
    try:
        set_rng_state(state)
    except Exception as err:  # noqa: BLE001 - any malformed entry: TypeError, KeyError, ValueError, RuntimeError...
        set_rng_state(before)
        raise CheckpointError(f"--resume: the checkpoint {str(where)!r} is corrupt: its random generator state does "
                              f"not load ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
                              ) from None


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    If anything fails before the replace, the temporary file is removed and ``path`` is untouched; a
    failed write is raised as its OSError (see the module doc).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with suppress(OSError):  # mkstemp makes it 0600; give it an ordinary file's mode
            os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            _save_to(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


class _Sink:
    """A binary file for ``torch.save`` that remembers the OSError a write raised (torch wraps it)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_to(obj: Any, f: Any) -> None:
    """``torch.save(obj, f)``, flushed and fsynced; a failed write raises its own OSError."""
    sink = _Sink(f)
    try:
        torch.save(obj, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # make a rename durable (POSIX)
        with suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def save_file(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path``, flushed and fsynced (into a folder not yet in place)."""
    with open(path, "wb") as f:
        _save_to(obj, f)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def replace_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Put the complete folder ``tmp`` in place of ``final`` (a folder, or nothing yet).

    A folder cannot be renamed over a non-empty one, so the previous ``final`` is first renamed
    aside (``.<name>.old``), then ``tmp`` renamed to ``final``, then the aside copy deleted. At every
    moment ``final`` or its aside copy is a complete checkpoint (:func:`dcp_path` reads either)."""
    tmp, final = Path(tmp), Path(final)
    old = _aside(final)
    if old.exists():
        if final.is_dir():
            shutil.rmtree(old)
        else:  # a crash left only the aside copy: keep it until the new folder is in place
            old = old.with_name(old.name + "2")
            shutil.rmtree(old, ignore_errors=True)
    if final.is_dir():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(_aside(final), ignore_errors=True)


def dcp_path(folder: str | os.PathLike[str]) -> Path:
    """The distributed checkpoint of an ``--fsdp`` run in ``folder``: ``checkpoint.dcp``, or its aside
    copy when a crash in :func:`replace_dir` left only that."""
    final = Path(folder) / DCP_NAME
    old = _aside(final)
    return old if not final.is_dir() and (old / DCP_META).is_file() else final


def has_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a checkpoint of either kind (``checkpoint.pt``, ``checkpoint.dcp``)."""
    return (Path(folder) / CHECKPOINT_NAME).exists() or dcp_path(folder).exists()


def remove_other(folder: str | os.PathLike[str], fsdp: bool) -> None:
    """After a save, delete the other kind's checkpoint (of an earlier run, overwritten) from ``folder``."""
    folder = Path(folder)
    if fsdp:
        with suppress(OSError):
            (folder / CHECKPOINT_NAME).unlink()
    else:
        for d in (folder / DCP_NAME, _aside(folder / DCP_NAME)):
            shutil.rmtree(d, ignore_errors=True)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_checked(file: Path, where: Path, format_: str, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of ``file``, checked for our ``format_``, version and ``keys``;
    every failure a CheckpointError naming the checkpoint ``where``."""
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # torch's weights-only refusals put the reason on a line of its own
        reason = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"--resume: the checkpoint {str(where)!r} is corrupt or unreadable ({reason[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != format_:
        raise CheckpointError(f"--resume: {str(where)!r} is not a lowrank-optim {what} checkpoint")
    if ckpt.get("version") not in READS:
        raise CheckpointError(f"--resume: {str(where)!r} has checkpoint version {ckpt.get('version')!r}; this "
                              f"lowrank-optim reads versions {', '.join(map(str, READS))}")
    if ckpt["version"] >= 2:
        integrity.verify_tree(ckpt, where)
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume: the checkpoint {str(where)!r} lacks {', '.join(missing)}")
    return ckpt


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint written by :func:`save_atomic` from a training run, checked for our format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {str(path)!r} (nothing to resume; drop --resume to start)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"--resume: the checkpoint {str(path)!r} is corrupt (truncated, or not a torch.save file)")
    return _read_checked(path, path, FORMAT, "pretrain",
                         ("model", "optimizer", "scheduler", "step", "position", "rng", "run"))


def load_dcp_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.pt`` of the distributed checkpoint folder ``path`` (see the module doc), checked for
    our format; the model and optimizer are read by ``torch.distributed.checkpoint.load``, once
    :func:`check_dcp_files` has checked every file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--resume: no checkpoint at {str(path)!r} (nothing to resume; drop --resume to start)")
    if not (path / DCP_META).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"--resume: the checkpoint {str(path)!r} is incomplete (no {DCP_META} or .metadata)")
    meta = _read_checked(path / DCP_META, path, DCP_FORMAT, "pretrain --fsdp",
                         ("scheduler", "step", "position", "rng", "run"))
    files = meta.get("files")
    if meta["version"] >= 2 and not (isinstance(files, dict) and ".metadata" in files
                                     and all(isinstance(v, dict) for v in files.values())):
        raise CheckpointError(f"--resume: the checkpoint {str(path)!r} does not list its files; it is corrupt")
    return meta


def check_dcp_files(path: Path, meta: dict[str, Any], rank: int = 0, world: int = 1) -> str | None:
    """Why the files of the distributed checkpoint ``path`` are not those ``meta`` lists (None: they
    are); rank ``rank`` of ``world`` checks every ``world``-th of them."""
    files = meta.get("files")
    if not isinstance(files, dict):  # version 1: nothing listed
        return None
    names = sorted(files)[rank::world]
    why = integrity.verify_files(path, files, names)
    return None if why is None else f"--resume: the checkpoint {str(path)!r} is corrupt: {why}"


def check_progress(saved: dict[str, Any], path: str | os.PathLike[str], max_steps: int, per_step: int) -> int:
    """The checkpoint's ``step``, once it, ``position`` and the scheduler's state are those a run of
    this schedule writes (CheckpointError naming the entry otherwise)."""
    step, position, sched = saved.get("step"), saved.get("position"), saved.get("scheduler")

    def refuse(what: str) -> None:
        raise CheckpointError(f"--resume: the checkpoint {str(path)!r} is corrupt: {what}")

    if not _is_int(step) or not 0 <= step <= max_steps:
        refuse(f"step={step!r}, not a step of this run (0 to --max-steps {max_steps})")
    if not _is_int(position) or position != step * per_step:
        refuse(f"position={position!r}, but {step} steps of {per_step} sequences end at {step * per_step}")
    if not isinstance(sched, dict) or not _is_int(sched.get("last_epoch")) or sched["last_epoch"] != step:
        last = sched.get("last_epoch") if isinstance(sched, dict) else type(sched).__name__
        refuse(f"its scheduler state ({last!r}) is not that of step {step}")
    if not isinstance(saved.get("rng"), dict):
        refuse(f"its random generator state is a {type(saved.get('rng')).__name__}, not a dict")
    return step


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse to resume a checkpoint whose trajectory-defining settings differ from this run's."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if where == "config" and isinstance(a, str) and isinstance(b, str):  # the config is kept as JSON text
            with suppress(ValueError):
                a, b = json.loads(a), json.loads(b)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        elif a != b:
            diffs.append(f"{where}: checkpoint {_short(a)}, now {_short(b)}")

    walk(_without_moved_data(saved, current), _without_moved_data(current, saved), "")
    if diffs:
        raise CheckpointError(
            f"--resume: the checkpoint {str(path)!r} is from a different run ({'; '.join(diffs[:3])}"
            f"{'; ...' if len(diffs) > 3 else ''}); resume with the same settings or use another --out"
        )


def _without_moved_data(spec: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without its data file's path when both runs read the same corpus by digest: a data file moved or
    copied to another folder (another machine's mount) is the same run's data, and its digest says so."""
    data, theirs = spec.get("data"), other.get("data")
    if not (isinstance(data, dict) and isinstance(theirs, dict)):
        return spec
    if data.get("digest") is None or data.get("digest") != theirs.get("digest"):
        return spec
    return {**spec, "data": {k: v for k, v in data.items() if k != "data"}}


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


__all__ = ["CHECKPOINT_NAME", "DCP_FORMAT", "DCP_META", "DCP_NAME", "FORMAT", "READS", "VERSION", "check_dcp_files",
           "check_progress", "check_same_run", "dcp_path",
           "has_checkpoint", "load", "load_dcp_meta", "remove_other", "replace_dir", "restore_rng", "rng_state",
           "save_atomic", "save_file", "set_rng_state"]
