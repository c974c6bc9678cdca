"""lowrank-optim pretrain / compare: the optimizer table, data, exact resume, atomic checkpoints,
bad input, and the optional dependencies. Runs llama_tiny for a few steps on tiny batches."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lowrank_optim as lro
from lowrank_optim.cli import main
from lowrank_optim.models import load_config
from lowrank_optim.train import TrainError, available, build_optimizer, checkpoint, data, optimizer_settings
from lowrank_optim.train import loop as train_loop

transformers = pytest.importorskip("transformers", reason="the train extra (transformers) is not installed")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "llama_tiny.json")
# Tiny runs: 4 sequences of 32 bytes a step, 256 held-out tokens per evaluation.
SMALL = ["--config", TINY, "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "256", "--no-progress"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_tree(a, b, where="") -> None:
    """Equal nested dicts/lists of tensors and plain values, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def tiny_model():
    return train_loop.build_model(load_config(TINY), 0, torch.float32, torch.device("cpu"))


# --------------------------------------------------------------------------- optimizers
def test_build_optimizer_knows_every_preset_and_the_baselines():
    from lowrank_optim.train.optimizers import MuonWithAdamW

    model = tiny_model()
    assert available() == ["adamw", "adafactor", "muon", *lro.PRESETS, "golore"]
    baselines = {"adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor, "muon": MuonWithAdamW}
    for name in available():
        opt = build_optimizer(name, model, max_steps=100)
        expected = baselines.get(name) or lro.PRESETS.get(name) or lro.GoLore
        assert type(opt) is expected, name
        settings = optimizer_settings(name, model)
        assert opt.param_groups[0]["lr"] == settings["lr"]
        if name not in baselines:
            # rank: a quarter of the hidden size (128 -> 32); APOLLO-Mini's is 1
            assert opt.param_groups[0]["rank"] == (1 if name == "apollo_mini" else 32), name
            assert any("rank" not in g or g["rank"] is None for g in opt.param_groups)  # embeddings, head, norms


def test_defaults_are_the_papers_from_llama_60m_up_and_tuned_below():
    tiny, m60 = tiny_model(), type("M", (), {"config": type("C", (), {"hidden_size": 512})()})()
    paper = {"adamw": (1e-3, None, None), "galore": (1e-2, 0.25, 128), "apollo": (1e-2, 1.0, 128),
             "apollo_mini": (1e-2, 128.0, 1), "frugal": (1e-3, 1.0, 128), "fira": (1e-2, 0.25, 128)}
    for name, (lr, scale, rank) in paper.items():
        s = optimizer_settings(name, m60)
        assert (s["lr"], s.get("scale"), s.get("rank")) == (lr, scale, rank), name
        assert s.get("update_proj_gap", 200) == 200 and s["weight_decay"] == 0.0
    assert optimizer_settings("apollo_mini", tiny) == {**optimizer_settings("apollo_mini", m60), "lr": 3e-2, "scale": 4.0}
    assert optimizer_settings("galore", tiny) == {**optimizer_settings("galore", m60), "lr": 3e-2, "rank": 32}
    assert optimizer_settings("apollo", tiny) == {**optimizer_settings("apollo", m60), "rank": 32}


def test_match_adamw_rms_replaces_the_table_s_scale():
    """``galore:lr=0.001:match_adamw_rms=True`` in compare: the table's scale (the paper's, for the paper's
    lr) gives way to the matched one, sqrt(128 / 32) = 2 on llama_tiny; a scale given beside it is refused."""
    model = tiny_model()
    assert "scale" not in optimizer_settings("galore", model, match_adamw_rms=True)
    opt = build_optimizer("galore", model, lr=1e-3, match_adamw_rms=True)
    assert (opt.param_groups[0]["scale"], opt.param_groups[0]["lr"]) == (2.0, 1e-3)
    with pytest.raises(TrainError, match="scale=0.5 and match_adamw_rms=True"):
        build_optimizer("galore", model, scale=0.5, match_adamw_rms=True)


def test_a_preset_without_a_table_entry_gets_the_generic_low_rank_defaults(monkeypatch):
    monkeypatch.setitem(lro.PRESETS, "brand_new", lro.GaLoreAdamW)
    opt = build_optimizer("brand_new", tiny_model())
    assert type(opt) is lro.GaLoreAdamW and (opt.param_groups[0]["lr"], opt.param_groups[0]["rank"]) == (1e-2, 32)
    assert "brand_new" in available()


def test_build_optimizer_options_override_the_table():
    model = tiny_model()
    opt = build_optimizer("galore", model, lr=0.02, rank=8, update_proj_gap=5, scale=0.5)
    g = opt.param_groups[0]
    assert (g["lr"], g["rank"], g["update_proj_gap"], g["scale"]) == (0.02, 8, 5, 0.5)
    assert build_optimizer("adamw", model, lr=3e-3).param_groups[0]["lr"] == 3e-3
    with pytest.raises(TrainError, match=f"unknown optimizer 'sgd'; choose one of: {', '.join(available())}$"):
        build_optimizer("sgd", model)
    with pytest.raises(TrainError, match="adamw takes no low-rank options"):
        build_optimizer("adamw", model, rank=4)


# --------------------------------------------------------------------------- data
def test_stdlib_corpus_is_bytes_with_a_fixed_heldout_split():
    files = data.stdlib_files()
    names = [rel for rel, _ in files]
    assert names == sorted(names) and not any("site-packages" in n for n in names)
    held = [n for n in names if data.is_heldout(n)]
    assert 0.02 < len(held) / len(names) < 0.09
    # the split is a stable hash of the relative path, the same on every machine
    for n in names[:50]:
        expected = int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") % 20 == 0
        assert data.is_heldout(n) == expected
    corpus = data.stdlib_corpus()
    assert corpus.vocab_needed == 259
    for stream in (corpus.train, corpus.heldout):
        assert stream.max() <= data.EOS and stream[-1] == data.EOS
    assert int((corpus.train == data.EOS).sum()) + int((corpus.heldout == data.EOS).sum()) == len(files)
    again = data.stdlib_corpus()
    assert corpus.spec == again.spec and np.array_equal(corpus.heldout, again.heldout)


def test_packed_sequences_are_a_function_of_seed_and_position():
    tokens = np.arange(1000, dtype=np.uint16) % 250
    seqs = data.PackedSequences(tokens, 10, seed=3)
    n = len(seqs)
    assert n == 99
    whole = seqs.get(0, 2 * n + 5)
    assert torch.equal(whole, torch.cat([seqs.get(0, 7), seqs.get(7, 2 * n - 2)]))
    assert torch.equal(whole, data.PackedSequences(tokens, 10, seed=3).get(0, 2 * n + 5))
    assert whole.shape == (2 * n + 5, 11) and torch.equal(whole[:, 1:-1], whole[:, :-2] + 1)
    first = sorted(int(r[0]) for r in whole[:n])  # an epoch visits every window once
    assert first == sorted(int(tokens[i * 10]) for i in range(n))
    assert not torch.equal(whole[:n], whole[n: 2 * n])  # a new order each epoch
    assert not torch.equal(whole[:n], data.PackedSequences(tokens, 10, seed=4).get(0, n))
    ev = data.heldout_windows(tokens, 10, 50)
    assert ev.shape == (5, 11) and ev[0, 0] == 0


def test_local_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(100)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    folder = data.local_corpus(tmp_path)
    assert len(folder.heldout) > 0 and len(folder.train) > len(folder.heldout)
    single = data.local_corpus(tmp_path / "a.txt")  # one document: the last 5% of tokens held out
    assert len(single.heldout) == (2400 + 1) // 20 and "last 5%" in single.name
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(TrainError, match=r"line 1 has no \"text\" string"):
        data.local_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(TrainError, match="no such file or folder"):
        data.local_corpus(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- training and resume
@pytest.mark.parametrize("flags", [
    ["--optimizer", "galore", "--update-proj-gap", "2", "--grad-accum", "2"],  # a refresh on each side of the stop
    ["--optimizer", "apollo_mini", "--update-proj-gap", "2", "--layerwise"],
], ids=["galore-accum", "apollo_mini-layerwise"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys, flags):
    common = [*SMALL, *flags, "--max-steps", "6", "--eval-every", "2", "--warmup", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli(capsys, "pretrain", *common, "--out", str(whole))[0] == 0
    assert cli(capsys, "pretrain", *common, "--out", str(parts), "--stop-at", "3")[0] == 0
    stopped = checkpoint.load(parts / "checkpoint.pt")
    assert stopped["step"] == 3 and stopped["position"] == 3 * 4 * (2 if "--grad-accum" in flags else 1)
    rc, out, _ = cli(capsys, "pretrain", *common, "--out", str(parts), "--resume")
    assert rc == 0 and "step 6" in out
    a, b = metrics(whole), metrics(parts)
    assert [r["step"] for r in b] == list(range(1, 7))  # step 4.. appended once after the checkpoint
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["eval_loss"] for r in a if "eval_loss" in r] == [b[i]["eval_loss"] for i in (1, 3, 5)]
    ca, cb = checkpoint.load(whole / "checkpoint.pt"), checkpoint.load(parts / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "step", "position", "run"):
        assert_same_tree(ca[key], cb[key], key)
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    assert not torch.equal(ca["model"]["model.layers.0.mlp.up_proj.weight"],
                           stopped["model"]["model.layers.0.mlp.up_proj.weight"])


def test_layerwise_and_bf16_runs(tmp_path, capsys):
    common = [*SMALL, "--optimizer", "galore", "--max-steps", "3", "--save-every", "0"]
    cli(capsys, "pretrain", *common, "--out", str(tmp_path / "plain"))
    cli(capsys, "pretrain", *common, "--out", str(tmp_path / "lw"), "--layerwise")
    a, b = checkpoint.load(tmp_path / "plain" / "checkpoint.pt"), checkpoint.load(tmp_path / "lw" / "checkpoint.pt")
    assert_same_tree(a["model"], b["model"])  # layer-wise updates change nothing, bit for bit
    assert [r["loss"] for r in metrics(tmp_path / "plain")] == [r["loss"] for r in metrics(tmp_path / "lw")]
    rc, _, _ = cli(capsys, "pretrain", *common, "--out", str(tmp_path / "bf16"), "--dtype", "bf16", "--checkpointing")
    c = checkpoint.load(tmp_path / "bf16" / "checkpoint.pt")
    assert rc == 0 and c["model"]["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    rec = metrics(tmp_path / "bf16")
    assert all(np.isfinite(r["loss"]) for r in rec) and rec[-1]["loss"] < rec[0]["loss"]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rec[0])


def test_a_failed_save_never_touches_the_existing_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    common = [*SMALL, "--optimizer", "galore", "--max-steps", "4", "--eval-every", "2", "--out", str(out)]
    assert cli(capsys, "pretrain", *common, "--stop-at", "2")[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kw):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    rc, _, err = cli(capsys, "pretrain", *common, "--resume")
    assert rc == 2
    assert err.strip().splitlines()[-1] == (f"lowrank-optim pretrain: error: could not save the checkpoint to {str(out / 'checkpoint.pt')!r} "
                           "(No space left on device); the previous checkpoint is unchanged")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary file left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert cli(capsys, "pretrain", *common, "--resume")[0] == 0  # the intact checkpoint resumes
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 4


def test_save_atomic_keeps_the_old_file_when_pickling_fails(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save_atomic({"a": torch.zeros(10_000), "b": Boom()}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert main(["pretrain", *SMALL, "--optimizer", "galore", "--max-steps", "2", "--out", str(out)]) == 0
    return out


def test_resuming_a_finished_run_says_so_instead_of_nan_tokens_per_second(tmp_path, capsys, finished_run):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(finished_run, out)  # the module's finished run stays as it was for the other tests
    rc, printed, _ = cli(capsys, "pretrain", *SMALL, "--optimizer", "galore", "--max-steps", "2", "--out", str(out),
                         "--resume")
    assert rc == 0 and "step 2" in printed and "no step left to train" in printed and "nan" not in printed, printed


def _bad(tmp_path, finished_run):
    small_vocab = tmp_path / "small_vocab.json"
    cfg = json.loads(Path(TINY).read_text())
    small_vocab.write_text(json.dumps({**cfg, "vocab_size": 256}))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes((finished_run / "checkpoint.pt").read_bytes()[:5000])
    resume = ["--optimizer", "galore", "--max-steps", "2", "--resume"]
    return [
        (["--optimizer", "sgd"], f"unknown optimizer 'sgd'; choose one of: {', '.join(available())}\n"),
        (["--optimizer", "galore:rank=16"], "(name:key=value entries are for `compare --optimizers`; pretrain takes "
                                            "the keys as flags: --optimizer galore --rank ..."),
        (["--config", str(tmp_path / "nope.json")], "no config file at"),
        (["--config", str(small_vocab)], "the config's vocab_size 256 does not fit the tokenizer (bytes: ids up to 258)"),
        (["--out", str(blocker / "sub")], "cannot write to --out"),
        (["--out", str(blocker)], "exists and is not a folder"),
        (["--out", str(corrupt), *resume], "is corrupt (truncated, or not a torch.save file)"),
        (["--out", str(finished_run), *resume, "--lr", "0.5"], "is from a different run (options.lr: checkpoint 0.03, now 0.5)"),
        (["--out", str(finished_run), *resume[:-1], "--optimizer", "adamw", "--resume"], "optimizer: checkpoint 'galore', now 'adamw'"),
        # another held-out set: one metrics.jsonl would mix two sets' losses (a QA pass)
        (["--out", str(finished_run), *resume, "--eval-tokens", "512"], "eval_tokens: checkpoint 256, now 512"),
        (["--out", str(finished_run), "--optimizer", "galore", "--max-steps", "2"], "already holds a checkpoint: pass --resume"),
        (["--out", str(tmp_path / "empty"), "--resume"], "no checkpoint at"),
        (["--seq-len", "300", "--eval-tokens", "600"], "--seq-len 300 exceeds the config's max_position_embeddings 256"),
        (["--optimizer", "adamw", "--rank", "4"], "adamw takes no low-rank options"),
        (["--max-steps", "0"], "--max-steps must be an integer >= 1"),
        # accepted before, meaning nothing (a QA pass)
        (["--max-steps", "4", "--stop-at", "10"], "--stop-at 10 is past --max-steps 4"),
        (["--eval-tokens", "5"], "--eval-tokens 5 is less than one sequence of --seq-len 32"),
        (["--data", str(tmp_path / "missing")], "no such file or folder"),
        (["--device", "nope"], "--device must be cpu or cuda[:i], got 'nope'"),
        (["--device", "meta"], "--device must be cpu or cuda[:i], got 'meta'"),
        # a traceback from torch, after the corpus was read, before (found by a QA pass)
        *([(["--device", "cuda"], "this torch sees no CUDA GPU")] if not torch.cuda.is_available() else []),
    ]


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, finished_run):
    """Each refusal is one line with status 2, and leaves no --out folder it created behind (an empty one was
    left by every typo, found by a QA pass)."""
    before = (finished_run / "checkpoint.pt").read_bytes()
    for flags, message in _bad(tmp_path, finished_run):
        argv = ["pretrain", *SMALL, "--out", str(tmp_path / "out"), *flags]
        rc, out, err = cli(capsys, *argv)
        assert rc == 2, flags
        assert err.count("\n") == 1 and err.startswith("lowrank-optim pretrain: error: "), (flags, err)
        assert message in err, (flags, err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "empty").exists(), flags
    assert (finished_run / "checkpoint.pt").read_bytes() == before


def test_compare_rejects_unknown_names_before_training(tmp_path, capsys):
    rc, _, err = cli(capsys, "compare", *SMALL, "--optimizers", "adamw,nope", "--max-steps", "2", "--out", str(tmp_path))
    assert rc == 2 and err.strip() == ("lowrank-optim compare: error: unknown optimizer 'nope'; choose one of: "
                                       + ", ".join(available()))
    rc, _, err = cli(capsys, "compare", *SMALL, "--optimizers", "adamw,,galore", "--max-steps", "2", "--out", str(tmp_path))
    assert rc == 2 and "has an empty entry (two commas, or one at an end)" in err  # it was dropped without a word
    rc, _, err = cli(capsys, "compare", *SMALL, "--optimizers", "galore:lr", "--max-steps", "2", "--out", str(tmp_path))
    assert rc == 2 and "written name:key=value" in err
    rc, _, err = cli(capsys, "compare", *SMALL, "--optimizers", "galore:rank=4:rank=8", "--max-steps", "2",
                     "--out", str(tmp_path))
    assert rc == 2 and "'galore:rank=4:rank=8' sets rank twice; give it once" in err and err.count("\n") == 1


def test_compare_refuses_an_entry_s_flags_before_any_entry_trains(tmp_path, capsys):
    """compare --layerwise with a ref: entry trained the entries before it in full, then failed saying to use
    compare (a QA pass): the refusal now comes before any training, names the entry and the flag to drop."""
    rc, _, err = cli(capsys, "compare", *SMALL, "--optimizers", "galore,ref:galore", "--max-steps", "2", "--layerwise",
                     "--out", str(tmp_path / "c"))
    assert rc == 2 and err.count("\n") == 1, err
    assert ("entry 'ref:galore': ref:galore (the reference package) does not run with --layerwise; drop --layerwise"
            in err), err
    assert not (tmp_path / "c").exists()


def test_compare_checks_every_entry_s_options_before_training_any(tmp_path, capsys):
    for entry, message in [("galore:rnak=4", "unknown option 'rnak'; did you mean 'rank'?"),
                           # not close enough for a group's near-miss check, which lets metadata through:
                           # an entry's options are all optimizer options, so it trained at the default gap
                           ("galore:proj_gap=4", "unknown option 'proj_gap'; did you mean 'update_proj_gap'?"),
                           ("galore:foo_bar=3", "unknown option 'foo_bar'; GaLoreAdamW takes "),
                           # every linear weight's short side is at most 10000: AdamW under GaLore's name
                           ("galore:rank=10000", "rank 10000 leaves all"),
                           ("galore:rank=0", "invalid rank=0"), ("apollo:scaling=row", "invalid scaling='row'")]:
        rc, _, err = cli(capsys, "compare", *SMALL, "--optimizers", f"adamw,{entry}", "--max-steps", "2",
                         "--out", str(tmp_path / "c"))
        assert rc == 2 and err.startswith(f"lowrank-optim compare: error: --optimizers: entry '{entry}': "), err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "c").exists()  # nothing trained, nothing written


# --------------------------------------------------------------------------- compare
def test_compare_two_optimizers(tmp_path, capsys):
    rc, out, _ = cli(capsys, "compare", *SMALL, "--optimizers", "adamw,galore:rank=8", "--max-steps", "4",
                     "--eval-every", "2", "--out", str(tmp_path))
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "optimizer", "lr", "rank", "held-out loss", "vs adamw", "perplexity", "tokens/s", "optimizer state (MiB)",
        "peak memory (MiB)"]
    assert lines[2].startswith("| adamw ") and lines[3].startswith("| galore:rank=8 ") and len(lines) == 4
    assert "n/a" in lines[2] and " 8 " in lines[3]
    doc = json.loads((tmp_path / "compare.json").read_text())
    runs = {r["label"]: r for r in doc["runs"]}
    assert set(runs) == {"adamw", "galore:rank=8"}
    # the shared settings name every entry, not the one optimizer the base arguments held ("optimizer": "galore")
    assert doc["settings"]["optimizers"] == ["adamw", "galore:rank=8"] and "optimizer" not in doc["settings"]
    for label, r in runs.items():
        assert [s for s, _ in r["curve"]] == [1, 2, 3, 4] and [s for s, _ in r["evals"]] == [2, 4]
        s = r["summary"]
        assert s["final_eval_loss"] == r["evals"][-1][1] and np.isclose(s["final_perplexity"], np.exp(s["final_eval_loss"]))
        assert s["state_bytes"] > 0 and s["tokens_per_s"] > 0 and s["peak_memory"] is None
        assert metrics(tmp_path / label.replace(":", "_"))[-1]["step"] == 4
    # same data and initial weights: both start from the same loss
    assert runs["adamw"]["curve"][0][1] == runs["galore:rank=8"]["curve"][0][1]
    assert runs["galore:rank=8"]["summary"]["state_bytes"] < runs["adamw"]["summary"]["state_bytes"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_finishes_its_files_when_stopped_while_writing_them(tmp_path, capsys, monkeypatch):
    """A SIGTERM after training, while compare.json and compare.png are written (a preemption has no idea where
    the run is), used to kill the process silently with the plot missing: it now waits for both files, says so,
    and exits 143 as a stopped run does."""
    import importlib
    import signal

    compare_module = importlib.import_module("lowrank_optim.train.compare")  # the package exports compare()

    real_plot = compare_module.plot

    def plot_under_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler before the plot is drawn
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(compare_module, "plot", plot_under_sigterm)
    with pytest.raises(SystemExit) as stopped:
        cli(capsys, "compare", *SMALL, "--optimizers", "adamw,galore:rank=8", "--max-steps", "2",
            "--eval-every", "2", "--out", str(tmp_path))
    assert stopped.value.code == 143
    err = capsys.readouterr().err
    assert "SIGTERM arrived while the results were written; they are complete, stopping" in err
    assert len(json.loads((tmp_path / "compare.json").read_text())["runs"]) == 2
    assert not list(tmp_path.glob(".compare.json.*"))  # no temporary left behind
    pytest.importorskip("matplotlib")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- optional dependencies
def test_import_and_errors_without_the_train_extra(tmp_path):
    """With transformers, datasets and matplotlib unimportable, the package imports and the commands
    say which extra to install."""
    code = f"""
import sys
for m in ("transformers", "datasets", "matplotlib"):
    sys.modules[m] = None
import lowrank_optim, lowrank_optim.train, lowrank_optim.cli
from lowrank_optim.cli import main
from lowrank_optim.models import load_config
rc = main(["pretrain", "--config", {TINY!r}, "--out", {str(tmp_path / 'x')!r}, "--max-steps", "1"])
rc2 = main(["pretrain", "--config", {TINY!r}, "--out", {str(tmp_path / 'y')!r}, "--data", "c4"])
assert (rc, rc2) == (2, 2), (rc, rc2)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        'lowrank-optim pretrain: error: training a LLaMA (LlamaForCausalLM) needs the transformers package: '
        'pip install "lowrank-optim[train]"',
        'lowrank-optim pretrain: error: --data c4 needs the datasets package: pip install "lowrank-optim[c4]"',
    ]


def test_c4_offline_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """--data c4 fails in one line, with no traceback and no minute of hub retries, when the hub
    cannot be reached, the tokenizer cannot be loaded, or the dataset cannot be opened."""
    import socket
    import types

    fake = types.ModuleType("datasets")

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore detail")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)

    def no_tokenizer(cls, name, **kw):
        raise OSError(f"We couldn't connect to load {name}")

    def unreachable(*a, **kw):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(no_tokenizer))
    monkeypatch.setattr(socket, "create_connection", unreachable)
    argv = ["pretrain", *SMALL, "--data", "c4", "--out", str(tmp_path / "a")]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1
    assert "error: the tokenizer 't5-base' needs the network, and " in err and "(Name or service not known)" in err

    monkeypatch.setattr(data, "check_hub", lambda what: None)  # the hub answers, the tokenizer still fails
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1
    assert "could not load the tokenizer 't5-base' (We couldn't connect to load t5-base); it needs the network" in err

    class FakeTok:  # a tokenizer that loads, so the dataset is what fails
        eos_token_id = 1

        def get_vocab(self):
            return {"a": 0, "</s>": 1, "b": 31999}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(lambda cls, name, **kw: FakeTok()))
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1
    assert "could not open allenai/c4 (Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)); --data c4 needs the network" in err


def test_compare_table_takes_an_adamw_entry_with_options_as_its_baseline():
    from lowrank_optim.train.compare import table

    def result(label, loss):
        return train_loop.RunResult(label=label, optimizer=label.split(":")[0], settings={"lr": 0.002}, steps=1,
                                    curve=[], evals=[], final_eval_loss=loss, tokens_per_s=1.0, state_bytes=0,
                                    peak_memory=None, train_seconds=1.0, out=None)

    text = table([result("adamw:lr=0.002", 2.0), result("galore:lr=0.002", 2.1)])
    assert "vs adamw:lr=0.002" in text and "1.050" in text and "1.000" in text
    # an entry named exactly adamw wins over one with options
    text = table([result("adamw:lr=0.004", 4.0), result("adamw", 2.0), result("galore", 2.1)])
    assert "vs adamw |" in text and "2.000" in text and "1.050" in text  # 4.0 / 2.0 and 2.1 / 2.0
