"""How far APOLLO parts from apollo-torch with the norm-growth limiter on, over a run.

With the limiter off the two agree to float32 round-off (``tests/test_parity_apollo_fira.py``). With it on,
apollo-torch limits the *uncorrected* ratio and applies Adam's bias correction afterwards, so its limiter
also holds back the bias-correction warm-up; ours limits the bias-corrected one, as the paper's algorithm
writes it. This runs both from the same weights on the same noisy gradients (a decaying spectrum plus
Gaussian noise, the same SVD subspace, LAPACK's signs on both sides) and prints, at a few steps,
|W_ours − W_theirs| / |W_ours − W_0| and |W_theirs − W_0| / |W_ours − W_0| (how much less apollo-torch has
moved)::

    OMP_NUM_THREADS=1 python3 bench/limiter_drift.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import lowrank_optim as lro  # noqa: E402


def _gradients(base: torch.Tensor, steps: int, noise: float) -> list[torch.Tensor]:
    shape = tuple(base.shape)
    g = torch.Generator().manual_seed(0)
    rms = base.norm() / (shape[0] * shape[1]) ** 0.5
    return [base + noise * rms * torch.randn(shape, generator=g) for _ in range(steps)]


def _trajectory(opt: torch.optim.Optimizer, W: torch.nn.Parameter, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for G in grads:
        W.grad = G.clone()
        opt.step()
        out.append(W.detach().clone())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--shape", type=int, nargs=2, default=[128, 64])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--gap", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.3, help="gradient noise RMS relative to the signal's")
    args = ap.parse_args()
    import apollo_torch

    from conftest import decaying_matrix

    shape = tuple(args.shape)
    W0 = decaying_matrix(*shape, seed=3, dtype=torch.float32)
    grads = _gradients(decaying_matrix(*shape, seed=9, dtype=torch.float32), args.steps, args.noise)
    for limiter in (1.01, None):
        ours_W, theirs_W = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
        ours = lro.APOLLO([{"params": [ours_W], "rank": args.rank, "update_proj_gap": args.gap, "projector": "svd",
                            "limiter": limiter, "projector_options": {"canonical_signs": False}}],
                          lr=1e-3, eps=1e-12, weight_decay=0.0)
        theirs = apollo_torch.APOLLOAdamW([{"params": [theirs_W], "rank": args.rank, "update_proj_gap": args.gap,
                                            "scale": 1.0, "proj_type": "std", "proj": "svd", "scale_type": "channel"}],
                                          lr=1e-3, eps=1e-12, weight_decay=0.0, disable_nl=limiter is None)
        a, b = _trajectory(ours, ours_W, grads), _trajectory(theirs, theirs_W, grads)
        for t in sorted({1, 10, 50, 100, args.steps - 1} & set(range(args.steps))):
            moved = (a[t] - W0).norm()
            print(f"limiter={limiter} step {t + 1}: |ours - theirs| / |ours - W0| = {((a[t] - b[t]).norm() / moved):.3f}, "
                  f"|theirs - W0| / |ours - W0| = {((b[t] - W0).norm() / moved):.3f}")


if __name__ == "__main__":
    main()
