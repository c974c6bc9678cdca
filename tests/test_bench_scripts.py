"""bench/: every benchmark script still imports and parses its arguments.

The scripts are run by hand and by ``bench/gpu_check.sh``, not by the suite, so an API they import
can move without any test noticing (``bench/nanogpt_lr.py`` once imported a helper that had been
renamed, and failed at its first line). Each script's ``--help`` imports the whole script and its
imports; ``nanogpt_lr.py``, which the README's migration table is measured with, also runs two steps.
All of it in one subprocess, so that torch is imported once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the pytest-benchmark files are collected by pytest, report.py takes a file, conftest/shapes are modules
NOT_SCRIPTS = {"conftest.py", "shapes.py", "report.py"}
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in NOT_SCRIPTS and not p.name.startswith("test_"))

DRIVER = """
import contextlib, io, json, runpy, sys
failures = {}
for name in json.loads(sys.argv[1]):
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path("bench/" + name, run_name="__main__")
        failures[name] = "--help returned without exiting"
    except SystemExit as e:
        if e.code not in (0, None):
            failures[name] = f"exit {e.code}"
    except Exception as e:
        failures[name] = f"{type(e).__name__}: {e}"
print(json.dumps(failures))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench"), env.get("PYTHONPATH", "")])
    return env


def test_every_bench_script_imports_and_parses_its_arguments():
    assert "nanogpt_lr.py" in SCRIPTS and "interleaved.py" in SCRIPTS
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(SCRIPTS)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert failures == {}, failures


def test_nanogpt_lr_runs_adamw_a_preset_and_its_reference_package(tmp_path):
    pytest.importorskip("galore_torch", reason="galore-torch is not installed")
    rows = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, "bench/nanogpt_lr.py", "--optimizers",
                          "adamw,galore:match_adamw_rms=True,ref:galore:match_adamw_rms=True",
                          "--steps", "2", "--batch", "2", "--json", str(rows)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(rows.read_text())
    assert [r["entry"] for r in got] == ["adamw", "galore:match_adamw_rms=True", "ref:galore:match_adamw_rms=True"]
    # two steps from a byte-level init (ln 260 = 5.56): finite and below the uniform model's loss
    assert all(0.0 < r["heldout_loss"] < 5.6 for r in got), got


def test_update_rms_pools_each_kind_against_adamw():
    """bench/update_rms.py, which the README's update-RMS table is measured with: three steps on nanoGPT.
    AdamW is its own reference (1.00x) in every kind; and on its first steps |m̂|/√v̂ is at most 1.001 per
    entry (Cauchy-Schwarz over the two steps' weights at betas (0.9, 0.99)), decay adding 1e-6 of lr: an
    RMS(dW)/lr above 1.01 is a wrong normalisation (by the base lr, not the warmed-up lr_t: 30x)."""
    out = subprocess.run([sys.executable, "bench/update_rms.py", "--model", "nanogpt", "--steps", "3", "--skip", "1",
                          "--optimizers", "adamw,galore:match_adamw_rms=True"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| adamw", "| galore:match_adamw_rms=True"]
    adamw = dict(cell.split(" ", 1) for cell in rows[0].strip("| ").split(" | ")[1:])
    assert set(adamw) == {"1-D", "embed/head", "projected"}
    assert all(v.endswith("(1.00x)") and 0.0 < float(v.split()[0]) <= 1.01 for v in adamw.values()), adamw


def test_real_gradients_cover_every_projected_weight_by_name_and_shape():
    """bench/interleaved.py gives the optimizers' projected weights (named by ``llama_shapes``) the
    gradients of ``real_gradients``' backward pass by name: every one must be there, with its shape."""
    pytest.importorskip("transformers", reason="the real backward pass builds LlamaForCausalLM")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from shapes import llama_shapes, projected_names, real_gradients
    finally:
        sys.path.remove(str(ROOT / "bench"))
    grads = real_gradients("llama_tiny", batch=2, seq=16)
    projected = projected_names("llama_tiny")
    assert projected and all(tuple(grads[n].shape) == s for n, s in llama_shapes("llama_tiny") if n in projected)
    assert all(bool(grads[n].abs().sum() > 0) for n in projected)


def test_nanogpt_lr_checks_every_entry_before_it_trains_any():
    out = subprocess.run([sys.executable, "bench/nanogpt_lr.py", "--optimizers", "adamw,ref:frugal", "--steps", "2",
                          "--batch", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "ref:frugal: no reference package" in out.stderr
    assert "| adamw |" not in out.stdout
