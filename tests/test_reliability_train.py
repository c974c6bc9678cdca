"""Hostile conditions for ``lowrank-optim pretrain``: tampered and bit-rotten checkpoints (both formats),
two writers on one --out, a full disk, preemption, divergence, links. Each test reproduces the attack
and checks that it is refused in one line (exit status 2, or 130/143 for a signal) with nothing lost."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowrank_optim.cli import main
from lowrank_optim.train import CheckpointError, checkpoint, integrity, saving
from lowrank_optim.train import loop as train_loop

pytest.importorskip("transformers", reason="the train extra (transformers) is not installed")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "llama_tiny.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small local text (byte-level): no reading of the standard library for each of these runs."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000)))
    return path


def flags(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", TINY, "--data", str(corpus), "--batch-size", "2", "--seq-len", "16",
            "--eval-tokens", "64", "--no-progress", "--optimizer", "galore", "--update-proj-gap", "2",
            "--device", "cpu", "--out", str(out), *extra]


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def one_line_error(err: str) -> str:
    """The last stderr line, checked to be the command's one-line error (no traceback before it)."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lowrank-optim pretrain: error: "), err
    return line


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, corpus) -> Path:
    """A finished 2-step run with its checkpoint (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main(flags(corpus, out, "--max-steps", "4", "--stop-at", "2")) == 0
    return out


def copy_run(saved_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


# ---------------------------------------------------------------------------- bit rot, tampering
def test_a_flipped_bit_in_a_weight_is_refused_naming_the_tensor(saved_run, tmp_path, corpus, capsys):
    """One exponent bit flipped inside a weight of checkpoint.pt (×16: 0.039 would become 0.626) still
    unpickles; before, the run resumed from it with rc 0. The digest written at save refuses it."""
    out = copy_run(saved_run, tmp_path)
    path = out / "checkpoint.pt"
    name = "model.layers.0.mlp.up_proj.weight"
    blob = torch.load(path, weights_only=True)["model"][name].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(blob)
    assert at > 0 and data.find(blob, at + 1) == -1  # the tensor's bytes, once
    data[at + 4 * 100 + 3] ^= 0x02  # float 100 of the weight: exponent bit 2, ×16 or ÷16
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["step"] == 2  # torch reads it without complaint
    rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "4", "--resume"))
    assert rc == 2
    assert one_line_error(err).endswith(f"the checkpoint {str(path)!r} is corrupt: the tensor 'model.{name}' differs "
                                        "from what was saved (bit rot or an edited file); resume from another copy, "
                                        "or start again")
    assert path.read_bytes() == bytes(data)  # refused, not rewritten


def resigned(saved: dict, **changes) -> dict:
    """The checkpoint with ``changes`` and a digest made for them: an attacker who rewrites the digest
    too gets past the integrity check, and must be refused by the checks of the values."""
    obj = {k: v for k, v in saved.items() if k != "digest"}
    obj.update(changes)
    return integrity.with_digest(obj)


def test_values_no_run_writes_are_refused_even_with_a_valid_digest(saved_run, tmp_path):
    """step -5 or 1000 (before: a traceback, or the wrong schedule), a position or a scheduler that
    are not those of the step, generators of the wrong type: each a CheckpointError naming the entry."""
    saved = checkpoint.load(saved_run / "checkpoint.pt")
    per_step, path = 2, tmp_path / "checkpoint.pt"  # --batch-size 2, one process, no accumulation
    assert checkpoint.check_progress(saved, path, 4, per_step) == 2
    cases = [({"step": -5}, "step=-5, not a step of this run"), ({"step": 1000}, "step=1000"),
             ({"step": True}, "step=True"), ({"position": 5}, "position=5, but 2 steps of 2 sequences end at 4"),
             ({"scheduler": [1, 2]}, "its scheduler state ('list') is not that of step 2"),
             ({"scheduler": {**saved["scheduler"], "last_epoch": 9}}, "its scheduler state (9)"),
             ({"rng": "seed"}, "its random generator state is a str")]
    for change, words in cases:
        checkpoint.save_atomic(resigned(saved, **change), path)
        tampered = checkpoint.load(path)  # its digest holds
        with pytest.raises(CheckpointError, match=r"is corrupt: " + re.escape(words)):
            checkpoint.check_progress(tampered, path, 4, per_step)
    where = str(path)
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="its random generator state does not load"):
        checkpoint.restore_rng({**saved["rng"], "numpy": {"key": "not a tensor"}}, where)
    assert torch.equal(torch.get_rng_state(), before)  # refused: the generators are as they were


def test_a_tampered_schedule_is_refused(saved_run):
    """A scheduler state with other base learning rates (10x) would run another schedule."""
    saved = checkpoint.load(saved_run / "checkpoint.pt")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.03)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train_loop.schedule(0, 4, 0.1))
    opt.param_groups[0]["lr"] = 0.03 * train_loop.schedule(0, 4, 0.1)(2)
    run = SimpleNamespace(sched=sched, opt=opt)
    state = {**saved["scheduler"], "base_lrs": [0.03], "last_epoch": 2}
    saving._load_schedule(run, state, 2, Path("ckpt"))  # this run's schedule loads
    with pytest.raises(ValueError, match=r"learning rates .* are not this schedule's at step 2"):
        saving._load_schedule(run, {**state, "base_lrs": [0.3]}, 2, Path("ckpt"))


def test_a_config_mismatch_names_the_key(saved_run, tmp_path, corpus, capsys):
    """--resume with a config that differs in one key (before: 'a different run', no key named): the
    line names the key and both values; the same for an optimizer option."""
    saved = checkpoint.load(saved_run / "checkpoint.pt")
    config = json.loads(saved["run"]["config"])
    now = {**saved["run"], "config": json.dumps({**config, "rms_norm_eps": 1e-5}, sort_keys=True)}
    with pytest.raises(CheckpointError, match=r"from a different run \(config.rms_norm_eps: checkpoint 1e-06, now 1e-05\)"):
        checkpoint.check_same_run(saved["run"], now, "ckpt")
    out = copy_run(saved_run, tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(Path(TINY).read_text()), "rms_norm_eps": 1e-5}))
    for extra, named in ((["--config", str(other)], "config.rms_norm_eps: checkpoint 1e-06, now 1e-05"),
                         (["--update-proj-gap", "3"], "options.update_proj_gap: checkpoint 2, now 3")):
        rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "4", "--resume", *extra))
        assert rc == 2 and f"is from a different run ({named}); resume with the same settings" in one_line_error(err)
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 2


def test_a_moved_data_file_resumes_and_other_data_is_refused(saved_run, tmp_path, corpus, capsys):
    """The same corpus at another path (moved, or another machine's mount) is the same run's data by its digest:
    --resume goes on (it was refused as 'a different run' on the absolute path). A file with other contents is
    still refused, naming the digest."""
    out = copy_run(saved_run, tmp_path)
    moved = tmp_path / "elsewhere" / "text.txt"
    moved.parent.mkdir()
    moved.write_bytes(corpus.read_bytes())
    rc, err = cli(capsys, *flags(moved, out, "--max-steps", "4", "--resume"))
    assert rc == 0, err
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 4
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("return", "yield"))
    rc, err = cli(capsys, *flags(other, copy_run(saved_run, tmp_path / "again"), "--max-steps", "4", "--resume"))
    assert rc == 2 and "is from a different run (data.data: " in one_line_error(err) and "data.digest" in err


def test_a_version_1_checkpoint_without_digest_still_loads(saved_run, tmp_path):
    saved = checkpoint.load(saved_run / "checkpoint.pt")
    old = {k: v for k, v in saved.items() if k != "digest"}
    checkpoint.save_atomic({**old, "version": 1}, tmp_path / "checkpoint.pt")
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 2
    checkpoint.save_atomic({**old, "version": 2}, tmp_path / "checkpoint.pt")  # a version 2 needs its digest
    with pytest.raises(CheckpointError, match="has no valid digest"):
        checkpoint.load(tmp_path / "checkpoint.pt")


# ---------------------------------------------------------------------------- a full disk
@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """``path`` as a tmpfs of ``size`` where this machine lets us mount one (root on Linux); yields
    whether it did (else ``path`` is an ordinary folder, and the test fakes the failure)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, corpus, capsys, monkeypatch):
    """On a 9 MiB tmpfs a checkpoint (6.1 MB) fits once, not twice: the save at step 4 runs out of space
    while the one of step 2 is still in place. Real torch.save turns that into ``RuntimeError: [enforce
    fail at inline_container.cc:672] unexpected pos`` (before: that 30-line traceback, rc 1). Without a
    tmpfs, real torch.save writes into a file whose writes fail with ENOSPC after 1 MiB, the same path."""
    out = tmp_path / "disk" / "run"
    steps: list[int] = []
    real_save = checkpoint.save_atomic
    monkeypatch.setattr(checkpoint, "save_atomic", lambda obj, path: (steps.append(obj["step"]), real_save(obj, path)))
    with small_disk(tmp_path / "disk", "9m") as mounted:
        if not mounted:

            class FillingDisk:
                """The temporary file of a save, on a disk that is full after 1 MiB of the save of step 4."""

                def __init__(self, f):
                    self.f, self.written = f, 0

                def write(self, data):
                    self.written += len(data)
                    if self.written > 2**20 and steps[-1] == 4:
                        raise OSError(28, "No space left on device")
                    return self.f.write(data)

                def __getattr__(self, name):
                    return getattr(self.f, name)

            real_init = checkpoint._Sink.__init__
            monkeypatch.setattr(checkpoint._Sink, "__init__", lambda self, f: real_init(self, FillingDisk(f)))
        rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "6", "--save-every", "2", "--eval-every", "6"))
        assert rc == 2
        assert one_line_error(err) == (f"lowrank-optim pretrain: error: could not save the checkpoint to "
                                       f"{str(out / 'checkpoint.pt')!r} (No space left on device); the previous "
                                       "checkpoint is unchanged")
        assert steps == [2, 4]
        assert checkpoint.load(out / "checkpoint.pt")["step"] == 2  # whole, and its digest holds
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary file


def test_a_full_disk_during_a_distributed_save_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    """The same for --fsdp (a 1-rank mesh in this process): torch.distributed.checkpoint reports the
    ENOSPC of a shard as a CheckpointException (a BaseException, so ``except Exception`` let it through
    as a traceback) whose text is torch.save's ``unexpected pos``, not the disk's. Without a tmpfs, the
    shard files of the save of step 4 are written to a stream that raises ENOSPC after 256 KiB."""
    out = tmp_path / "disk" / "run"
    with small_disk(tmp_path / "disk", "9m") as mounted:
        if not mounted:
            from torch.distributed.checkpoint import filesystem

            real_create = filesystem.FileSystem.create_stream

            class FullDisk:
                """A shard's stream on a disk that fills after 256 KiB: inside a tensor's torch.save,
                which wraps the ENOSPC in ``unexpected pos`` as it does on a real disk."""

                def __init__(self, f):
                    self.f, self.written = f, 0

                def write(self, data):
                    self.written += len(data)
                    if self.written > 2**18:
                        raise OSError(28, "No space left on device")
                    return self.f.write(data)

                def __getattr__(self, name):
                    return getattr(self.f, name)

            @contextlib.contextmanager
            def create_stream(self, path, mode):
                with real_create(self, path, mode) as f:
                    yield FullDisk(f) if f".{checkpoint.DCP_NAME}.4.tmp" in str(path) else f

            monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)
        rc, err = cli(capsys, *flags(corpus, out, "--fsdp", "--max-steps", "6", "--save-every", "2", "--eval-every", "6"))
        assert rc == 2
        assert one_line_error(err) == (f"lowrank-optim pretrain: error: could not save the checkpoint to "
                                       f"{str(out / checkpoint.DCP_NAME)!r} (No space left on device); the previous "
                                       "checkpoint is unchanged")
        assert checkpoint.load_dcp_meta(out / checkpoint.DCP_NAME)["step"] == 2
        assert sorted(p.name for p in out.iterdir()) == [checkpoint.DCP_NAME, "metrics.jsonl"]


def test_a_failing_metrics_write_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    """metrics.jsonl's append fails (ENOSPC) after step 1 of a resumed run: one line naming the file and
    the intact checkpoint, status 2, every rank alike (before: a traceback)."""
    out = tmp_path / "run"
    assert cli(capsys, *flags(corpus, out, "--max-steps", "3", "--stop-at", "1"))[0] == 0

    class FullDisk:
        def __init__(self, real):
            self.real = real

        def write(self, text):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(train_loop, "open", lambda *args, **kw: FullDisk(open(*args, **kw)), raising=False)
    rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "3", "--resume"))
    assert rc == 2
    assert one_line_error(err).endswith(f"could not write the metrics to {str(out / 'metrics.jsonl')!r} (No space "
                                        "left on device) after step 2; the checkpoint of step 1 is intact: free "
                                        "space, then --resume")
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 1


# ---------------------------------------------------------------------------- preemption, leftovers
def test_ctrl_c_inside_a_save_finishes_it_then_stops_and_leftovers_are_removed(tmp_path, corpus, capsys, monkeypatch):
    """SIGINT arrives while the checkpoint of step 2 is being written (before: a traceback 7 times in 20,
    ignored twice). The save completes, the run stops at that step boundary with status 130, and the
    checkpoint resumes. What SIGKILLed saves leave (temporary files, up to a whole checkpoint each) is
    removed by the next run."""
    out = tmp_path / "run"
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the middle of the save
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    handler = signal.getsignal(signal.SIGINT)
    rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "4", "--save-every", "2"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert rc == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("lowrank-optim pretrain: stopped by SIGINT after step 2; the checkpoint of "
                                            "step 2 is saved; --resume continues")
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 2 and [r["step"] for r in records(out)] == [1, 2]
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handler is gone

    (out / ".checkpoint.pt.k2j3h4.tmp").write_bytes(b"\0" * 2**20)  # a save killed midway
    (out / ".checkpoint.dcp.7.tmp").mkdir()
    (out / ".checkpoint.dcp.7.tmp" / "__0_0.distcp").write_bytes(b"\0" * 1000)
    (out / ".metrics.jsonl.a1b2.tmp").write_text("{}")
    rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "4", "--resume"))
    assert rc == 0 and "removed 3 temporary file(s) of interrupted saves (1.0 MiB)" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------- divergence, links
def test_divergence_at_a_refresh_is_one_line_and_metrics_links_are_not_followed(tmp_path, corpus, capsys, monkeypatch):
    """Step 1 refreshes every subspace. A loss that is NaN there used to reach the optimizer's refresh
    first (a NonFiniteGradientError traceback); a gradient that is NaN with a finite loss the same. Both
    are the documented one line now. The fresh run's metrics.jsonl was a link: its target stays as it was."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "metrics.jsonl").symlink_to(victim)
    real_loss = train_loop.lm_loss
    monkeypatch.setattr(train_loop, "lm_loss", lambda model, x, **kw: real_loss(model, x, **kw) * float("nan"))
    rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "2", "--lr", "0.03"))
    assert rc == 2
    assert one_line_error(err).endswith("the training loss is nan at step 1; lower --lr (now 0.03)")
    assert victim.read_text() == "precious\n" and not (out / "metrics.jsonl").is_symlink()

    monkeypatch.setattr(train_loop, "lm_loss", real_loss)
    real_clip = torch.nn.utils.clip_grad_norm_

    def poisoned(params, max_norm):  # the loop clips in the model's order: the first such weight is the embedding
        params = list(params)
        norm = real_clip(params, max_norm)
        next(p for p in params if p.dim() == 2 and min(p.shape) > 32).grad[0, 0] = float("inf")
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    rc, err = cli(capsys, *flags(corpus, tmp_path / "run2", "--max-steps", "2", "--lr", "0.03"))
    assert rc == 2
    line = one_line_error(err)
    assert "a gradient holds inf or NaN at step 1 (GaLoreAdamW: parameter 'model.embed_tokens.weight' " \
           "has a non-finite gradient (inf or NaN) at step 1)" in line and line.endswith("lower --lr (now 0.03)")


def test_a_resumed_run_does_not_follow_a_metrics_link(saved_run, tmp_path, corpus, capsys):
    """On --resume, metrics.jsonl is a link: to a file (before: read, kept records from it) or to a
    path that does not exist (before: appending through it created that file). The link is replaced by
    a file of this run's records; the target is neither read nor written."""
    victim, absent = tmp_path / "victim.txt", tmp_path / "absent.txt"
    victim.write_text('{"step": 1}\n')
    for target in (victim, absent):
        out = copy_run(saved_run, tmp_path / target.stem)
        (out / "metrics.jsonl").unlink()
        (out / "metrics.jsonl").symlink_to(target)
        rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "4", "--resume"))
        assert rc == 0, err
        assert not (out / "metrics.jsonl").is_symlink() and [r["step"] for r in records(out)] == [3, 4]
    assert victim.read_text() == '{"step": 1}\n' and not absent.exists()


# ---------------------------------------------------------------------------- two writers, SIGTERM
def test_a_run_refused_the_instant_the_holder_locked_still_names_it(tmp_path, monkeypatch):
    """A run started at the same moment as another can find the lock taken and the file still empty (the
    holder writes its name right after flock): the refused run waits for the name, up to NAME_WAIT_S,
    rather than saying "a process that has not written its name yet" (CI saw that line once in the
    two-process test below). A holder that never writes is still reported as such, after the wait."""
    import fcntl
    import threading

    from lowrank_optim.train import outdir

    monkeypatch.setattr(outdir, "NAME_WAIT_S", 1.0)
    held = os.open(tmp_path / outdir.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file description: conflicts in-process
        with pytest.raises(outdir.TrainError, match="has not written its name yet"):
            outdir.OutLock(tmp_path).acquire()
        late = threading.Timer(0.3, lambda: os.write(held, json.dumps({"pid": 4242, "host": "h", "started": "s"})
                                                      .encode()))
        late.start()
        try:
            with pytest.raises(outdir.TrainError, match=r"in use by another run \(pid 4242 on h, started s\)"):
                outdir.OutLock(tmp_path).acquire()
        finally:
            late.join()
    finally:
        os.close(held)


def test_two_runs_on_one_out_and_preemption_by_sigterm(tmp_path, corpus, capsys):
    """Two runs started together on one --out (before: both ran, metrics.jsonl held every step twice and
    the checkpoint was whichever saved last). One holds the folder; the other, and --resume or
    --overwrite while it lives, are refused naming it. SIGTERM then stops it at the next step boundary
    with a checkpoint of that step (before: killed at once, up to --save-every steps lost), status 143,
    and --resume continues from there."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "lowrank_optim.cli", *flags(corpus, out, "--max-steps", "100000", "--save-every", "0")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 240
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.wait() == 2 and winner.poll() is None
        line = one_line_error(loser.stderr.read())
        assert f"--out {str(out)!r} is in use by another run (pid {winner.pid} on {socket.gethostname()}, started " in line
        assert line.endswith("); wait for it to end or stop it, or choose another --out")
        for extra in (["--resume"], ["--overwrite"]):
            rc, err = cli(capsys, *flags(corpus, out, "--max-steps", "100000", "--save-every", "0", *extra))
            assert rc == 2 and f"is in use by another run (pid {winner.pid} on" in one_line_error(err), extra
        while not (out / "metrics.jsonl").exists() or len(records(out)) < 2:
            assert winner.poll() is None and time.monotonic() < deadline, winner.stderr.read()
            time.sleep(0.1)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=120) == 143
        last = winner.stderr.read().strip().splitlines()[-1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    steps = [r["step"] for r in records(out)]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, each step once
    assert last == (f"lowrank-optim pretrain: stopped by SIGTERM after step {steps[-1]}; the checkpoint of step "
                    f"{steps[-1]} is saved; --resume continues")
    assert checkpoint.load(out / "checkpoint.pt")["step"] == steps[-1]  # nothing lost
    rc, _ = cli(capsys, *flags(corpus, out, "--max-steps", "100000", "--save-every", "0", "--resume",
                               "--stop-at", str(steps[-1] + 1)))
    assert rc == 0 and [r["step"] for r in records(out)] == [*steps, steps[-1] + 1]
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------- distributed checkpoints
@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus) -> Path:
    """A 1-step --fsdp run in this process (a 1-rank FSDP2 mesh): a checkpoint.dcp folder."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    assert main(flags(corpus, out, "--fsdp", "--max-steps", "2", "--stop-at", "1")) == 0
    return out


def test_dcp_files_are_listed_and_checked(fsdp_run, tmp_path):
    """meta.pt lists every file with its size and SHA-256; a truncated, missing or changed shard is named."""
    folder = tmp_path / checkpoint.DCP_NAME
    shutil.copytree(fsdp_run / checkpoint.DCP_NAME, folder)
    meta = checkpoint.load_dcp_meta(folder)
    assert sorted(meta["files"]) == [".metadata", "__0_0.distcp"]
    assert checkpoint.check_dcp_files(folder, meta) is None
    shard = folder / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    assert checkpoint.check_dcp_files(folder, meta).endswith(
        f"is corrupt: its file '__0_0.distcp' has {len(data) - 100} bytes, {len(data)} were written (truncated or replaced)")
    shard.unlink()
    assert checkpoint.check_dcp_files(folder, meta).endswith("is corrupt: its file '__0_0.distcp' is missing")
    assert checkpoint.check_dcp_files(folder, meta, rank=0, world=2) is None  # rank 0 of 2: .metadata only


def test_a_truncated_or_missing_shard_is_one_line(fsdp_run, tmp_path, corpus, capsys):
    """A shard cut to half its size, or deleted (before: a CheckpointException traceback, which
    ``except Exception`` misses): refused in one line naming the file. With meta.pt's digests rewritten
    to match the cut shard, torch's reader itself meets the short file: one line too."""
    for case in ("truncated", "missing", "resigned"):
        out = copy_run(fsdp_run, tmp_path / case)
        folder = out / checkpoint.DCP_NAME
        shard = folder / "__0_0.distcp"
        size = shard.stat().st_size
        if case == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[: size // 2])
        if case == "resigned":
            meta = torch.load(folder / checkpoint.DCP_META, weights_only=True)
            meta["files"]["__0_0.distcp"] = integrity.file_digest(shard)
            checkpoint.save_file(integrity.with_digest({k: v for k, v in meta.items() if k != "digest"}),
                                 folder / checkpoint.DCP_META)
        rc, err = cli(capsys, *flags(corpus, out, "--fsdp", "--max-steps", "2", "--resume"))
        assert rc == 2, case
        line = one_line_error(err)
        why = {"truncated": f"is corrupt: its file '__0_0.distcp' has {size // 2} bytes, {size} were written "
                            "(truncated or replaced)",
               "missing": "is corrupt: its file '__0_0.distcp' is missing",
               "resigned": "does not fit this model and optimizer, or is corrupt ("}[case]
        assert f"the checkpoint {str(folder)!r} {why}" in line, (case, line)


def test_fsdp_resume_runs_no_code_and_refuses_bit_rot(fsdp_run, tmp_path, corpus, capsys):
    """A .metadata replaced by a pickle whose __reduce__ calls os.system: before, `--fsdp --resume` ran
    it. Refused by the digest in meta.pt; and when the attacker rewrites meta.pt's digests too, by the
    allow-list unpickler, which runs nothing. A flipped byte in a shard: before, rc 0; now one line."""
    out = copy_run(fsdp_run, tmp_path)
    folder = out / checkpoint.DCP_NAME
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / ".metadata").write_bytes(pickle.dumps(Exploit()))
    resume = flags(corpus, out, "--fsdp", "--max-steps", "2", "--resume")
    rc, err = cli(capsys, *resume)
    assert rc == 2 and "is corrupt: its file '.metadata' has" in one_line_error(err)
    meta = torch.load(folder / checkpoint.DCP_META, weights_only=True)
    meta["files"][".metadata"] = integrity.file_digest(folder / ".metadata")
    checkpoint.save_file(integrity.with_digest({k: v for k, v in meta.items() if k != "digest"}), folder / checkpoint.DCP_META)
    rc, err = cli(capsys, *resume)
    assert rc == 2 and "system is not part of a distributed checkpoint's metadata" in one_line_error(err), err
    assert not marker.exists()

    shutil.rmtree(out)
    out = copy_run(fsdp_run, tmp_path)
    shard = out / checkpoint.DCP_NAME / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    rc, err = cli(capsys, *resume)
    assert rc == 2 and one_line_error(err).endswith(
        f"the checkpoint {str(out / checkpoint.DCP_NAME)!r} is corrupt: its file '__0_0.distcp' differs from what "
        "was written (bit rot or an edited file)")
