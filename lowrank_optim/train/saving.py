"""Saving and resuming a run: the single file (DDP, one process) and the distributed checkpoint (FSDP2).

Everything that can fail here because of the disk or the checkpoint's contents fails as one
:class:`TrainError` line (exit status 2), on every rank alike, with the previous checkpoint intact:
a full disk during a save, a corrupt, tampered, truncated or missing file, a checkpoint of another run,
values no run of this schedule writes. See :mod:`.checkpoint` for the formats and :mod:`.integrity` for
the digests and the tensors-only reading of distributed checkpoints.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from . import integrity
from .errors import CheckpointError, TrainError

if TYPE_CHECKING:
    from .loop import _Run


def reason(err: BaseException) -> str:
    """What went wrong, in a few words: the OSError's text inside ``err`` (``torch.save`` wraps a full disk
    in a RuntimeError, torch.distributed.checkpoint in a CheckpointException of every rank's failure),
    else the first line of the innermost message."""
    stack, seen, first = [err], set(), None
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack.extend(pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair)
        elif first is None:
            first = e
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    text = str(first if first is not None else err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def dcp_failures() -> tuple[type[BaseException], ...]:
    """What torch.distributed.checkpoint raises: ordinary exceptions, and CheckpointException, which
    derives from BaseException (so ``except Exception`` misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def agree(error: str | None, everyone: bool = False) -> None:
    """Raise ``error`` as a TrainError on every rank: rank 0's (a step rank 0 did alone), or with
    ``everyone`` the first rank's that has one (each rank checked its own share)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if everyone:
            errors: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        else:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
    if error is not None:
        raise CheckpointError(error) if error.startswith("--resume") else TrainError(error)


# ----------------------------------------------------------------- saving
def save(run: _Run, at: int, position: int) -> None:
    """Checkpoint step ``at`` (next sequence ``position``), if the run saves: every rank writes its
    shards under FSDP2, else rank 0 writes the single file."""
    if not run.a.save or run.ckpt_path is None:
        return
    if run.a.fsdp:
        _save_fsdp(run, at, position)
    elif run.is_main:
        _save_single_file(run, at, position)


def _meta(run: _Run, at: int, position: int) -> dict[str, Any]:
    return {"step": at, "position": position, "scheduler": run.sched.state_dict(), "rng": ckpt_io.rng_state(),
            "run": run.run_spec}


def _save_single_file(run: _Run, at: int, position: int) -> None:
    """Write the checkpoint of step ``at`` atomically, with its digest; then delete an earlier run's
    ``--fsdp`` checkpoint from the folder."""
    obj = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, **_meta(run, at, position),
           "model": run.model.state_dict(), "optimizer": run.opt.state_dict()}
    if run.sampler is not None:
        obj["sampler"] = run.sampler.state_dict()
    try:
        ckpt_io.save_atomic(integrity.with_digest(obj), run.ckpt_path)
    except OSError as err:
        raise TrainError(f"could not save the checkpoint to {str(run.ckpt_path)!r} ({err.strerror or err}); "
                         "the previous checkpoint is unchanged") from None
    ckpt_io.remove_other(run.out, fsdp=False)


def _dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _save_fsdp(run: _Run, at: int, position: int) -> None:
    """Every rank writes its shards into ``.checkpoint.dcp.<step>.tmp`` and hashes them, rank 0 adds
    ``meta.pt`` (with every file's digest); after a barrier rank 0 puts the folder in place."""
    import torch.distributed.checkpoint as dcp

    is_main = dist.get_rank() == 0
    final = run.out / ckpt_io.DCP_NAME
    tmp = run.out / f".{ckpt_io.DCP_NAME}.{at}.tmp"
    failed = lambda why: f"could not save the checkpoint to {str(final)!r} ({why}); the previous checkpoint is unchanged"  # noqa: E731
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
    dist.barrier()
    writer = _recording_writer(tmp)
    why = None
    try:
        dcp.save(_dcp_state(run.model, run.opt), storage_writer=writer)
    except dcp_failures() as err:  # raised on every rank: DCP gathers the ranks' write results
        why = writer.os_error.strerror if writer.os_error is not None else reason(err)
    files = _gather_digests(tmp, why, writer.os_error is not None)
    error = failed(files) if isinstance(files, str) else None
    if error is None and is_main:
        meta = {"format": ckpt_io.DCP_FORMAT, "version": ckpt_io.VERSION, **_meta(run, at, position)}
        try:
            meta["files"] = {**files, **integrity.files_digest(tmp, [".metadata"])}
            ckpt_io.save_file(integrity.with_digest(meta), tmp / ckpt_io.DCP_META)
            ckpt_io.replace_dir(tmp, final)
            ckpt_io.remove_other(run.out, fsdp=True)
        except OSError as err:
            error = failed(err.strerror or err)
    if is_main and error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    agree(error)  # also the barrier: no rank goes on before the checkpoint is in place


def _recording_writer(path: Path) -> Any:
    """torch's FileSystemWriter for ``path`` whose streams keep, in ``writer.os_error``, the first OSError a
    write of this rank raised: torch.save inside it turns ENOSPC into ``RuntimeError: ... unexpected pos``,
    and DCP hands that RuntimeError to the ranks pickled, without its cause."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path))
    writer.os_error = None
    create = writer.fs.create_stream

    @contextmanager
    def create_stream(p: Any, mode: str) -> Iterator[Any]:
        try:
            with create(p, mode) as stream:
                yield stream
        except BaseException as err:
            writer.os_error = writer.os_error or _os_error(err)
            raise

    writer.fs.create_stream = create_stream  # the instance's, which the writer hands to its write threads
    return writer


def _os_error(err: BaseException) -> OSError | None:
    """The OSError (with its text) that ``err`` is, or was raised while handling."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.strerror:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _gather_digests(tmp: Path, why: str | None, exact: bool) -> dict[str, Any] | str:
    """The digests of every rank's shard files (each rank hashes the ``__<rank>_*.distcp`` it wrote), or
    why a rank could not save: ``why`` of the first rank that knows the OSError itself (``exact``), else
    of the first that failed."""
    mine: dict[str, Any] | tuple[bool, str] = (exact, why) if why is not None else {}
    if why is None:
        try:
            mine = integrity.files_digest(tmp, [p.name for p in tmp.glob(f"__{dist.get_rank()}_*.distcp")])
        except OSError as err:
            mine = (True, err.strerror or str(err))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failures = sorted((not m[0], rank, m[1]) for rank, m in enumerate(everyone) if isinstance(m, tuple))
    return failures[0][2] if failures else {k: v for m in everyone for k, v in m.items()}


# ----------------------------------------------------------------- resuming
def resume(run: _Run) -> tuple[int, int]:
    """(step, position) to start from: (0, 0), or with ``--resume`` those of the checkpoint in
    ``--out``, whose model, optimizer, schedule and generators it restores."""
    if not run.a.resume:
        return 0, 0
    _check_kind(run.out, run.a.fsdp)
    if run.a.fsdp:
        step, position = _load_fsdp(run, ckpt_io.dcp_path(run.out))
    else:
        step, position = _load_single_file(run, run.ckpt_path)
    run.say(f"resumed from {run.ckpt_path} at step {step}")
    return step, position


def _check_kind(out: Path, fsdp: bool) -> None:
    """Refuse ``--resume`` of the other kind's checkpoint with a message that says which flag to use."""
    has_pt, has_dcp = (out / ckpt_io.CHECKPOINT_NAME).exists(), ckpt_io.dcp_path(out).exists()
    if fsdp and has_pt and not has_dcp:
        raise CheckpointError(f"--resume: {str(out)!r} holds the checkpoint of a run without --fsdp "
                              f"({ckpt_io.CHECKPOINT_NAME}); resume it without --fsdp")
    if not fsdp and has_dcp and not has_pt:
        raise CheckpointError(f"--resume: {str(out)!r} holds the checkpoint of an --fsdp run "
                              f"({ckpt_io.DCP_NAME}); resume it with --fsdp, under the same torchrun")


def _load_single_file(run: _Run, path: Path) -> tuple[int, int]:
    """Restore a single-file checkpoint into the model, optimizer, schedule and the global generators."""
    saved = ckpt_io.load(path)
    ckpt_io.check_same_run(saved["run"], run.run_spec, path)
    step = ckpt_io.check_progress(saved, path, run.a.max_steps, run.per_step)
    try:
        run.model.load_state_dict(saved["model"])
        run.opt.load_state_dict(saved["optimizer"])
        if run.sampler is not None:
            run.sampler.load_state_dict(saved["sampler"])
        _load_schedule(run, saved["scheduler"], step, path)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"--resume: the checkpoint {str(path)!r} does not fit this model and "
                              f"optimizer ({reason(err)[:160]})") from None
    ckpt_io.restore_rng(saved["rng"], path)
    return step, saved["position"]


def _load_schedule(run: _Run, state: dict[str, Any], step: int, path: Path) -> None:
    """The scheduler's state, refused unless it gives this run's schedule: the same base learning rates,
    and every group's lr the one the schedule sets after ``step`` steps (the same expression, so the same
    float)."""
    base = list(run.sched.base_lrs)
    run.sched.load_state_dict(state)
    expected = [b * lam(step) for b, lam in zip(base, run.sched.lr_lambdas)]
    if list(run.sched.base_lrs) != base or [float(g["lr"]) for g in run.opt.param_groups] != expected:
        raise ValueError(f"its learning rates ({[float(g['lr']) for g in run.opt.param_groups][:2]}, base "
                         f"{list(run.sched.base_lrs)[:2]}) are not this schedule's at step {step}")


def _load_fsdp(run: _Run, path: Path) -> tuple[int, int]:
    """Restore an ``--fsdp`` checkpoint into the sharded model, optimizer and schedule and the generators,
    once every rank has checked its share of the files against ``meta.pt``'s digests."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    error = None
    try:
        meta = ckpt_io.load_dcp_meta(path)
        ckpt_io.check_same_run(meta["run"], run.run_spec, path)
        step = ckpt_io.check_progress(meta, path, run.a.max_steps, run.per_step)
        error = ckpt_io.check_dcp_files(path, meta, dist.get_rank(), dist.get_world_size())
    except CheckpointError as err:
        error = str(err)
    agree(error, everyone=True)
    init = getattr(run.opt, "init_state", None)
    if callable(init):  # the template DCP loads into; torch's DSD would otherwise run a zero-gradient step
        init()
    try:
        state = _dcp_state(run.model, run.opt)
        integrity.safe_dcp_load(state, path)
        set_model_state_dict(run.model, state["model"])
        set_optimizer_state_dict(run.model, run.opt, state["optim"])
        _load_schedule(run, meta["scheduler"], step, path)
    except dcp_failures() as err:
        error = (f"--resume: the checkpoint {str(path)!r} does not fit this model and optimizer, or is "
                 f"corrupt ({reason(err)[:160]})")
    agree(error, everyone=True)
    ckpt_io.restore_rng(meta["rng"], path)
    return step, meta["position"]
