"""Named methods: each a LowRankAdamW with the options of its paper."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .lowrank import LowRankAdamW


class GaLoreAdamW(LowRankAdamW):
    """GaLore: Adam in the gradient's top-r singular subspace, refreshed by SVD (Zhao et al. 2024).

    "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv:2403.03507.
    Adam runs on the gradient projected onto its top-r singular
    vectors, refreshed by an SVD every ``update_proj_gap`` steps, the residual dropped, the update
    scaled by ``scale``. Moments are kept across refreshes.

    Paper settings: lr 0.01, scale 0.25, gap 200, rank 128/256/256/512 for LLaMA 60M/130M/350M/1B;
    7B: rank 1024, gap 500, lr 0.005. The group keys of galore-torch (``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``) are read the same way.

    Departures from galore-torch 1.0, each deliberate and tested: ε is added to the bias-corrected
    √V̂ and weight decay is taken from the pre-update weights (both as ``torch.optim.AdamW``); the
    projector lives in the state as tensors (so checkpoints load with ``weights_only=True``);
    ``project_back`` takes the side from the stored basis, not from the low-rank tensor's shape;
    moments stay float32 for bf16/fp16 weights.
    """

    preset = {"projector": "svd", "scale": 0.25, "update_proj_gap": 200}


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore with blockwise INT8 Adam moments (Zhao et al. 2024, the paper's 8-bit GaLore).

    GaLore's rule with M and V stored as uint8 codes and a float32 absmax per block of 256, in a
    dynamic (exponent) code book as bitsandbytes' 8-bit Adam uses (Dettmers et al. 2022): each step
    dequantizes them, updates in float32, computes N from the float32 values and requantizes, in one
    fused kernel on CUDA. Plain parameters (embeddings, head) keep 8-bit moments too; moments of
    fewer than 4096 elements stay float32. No per-step copy of the weight is made.
    ``state_bits=8`` gives the same storage to any other preset.
    """

    preset = {**GaLoreAdamW.preset, "state_bits": 8}


class QGaLoreAdamW(GaLoreAdamW):
    """Q-GaLore: INT4 projections, a layer-adaptive lazy refresh, INT8 states and INT8 weights
    updated by stochastic rounding (Zhang et al. 2024, arXiv:2407.08296).

    The SVD basis is stored as INT4 (min–max with a float zero point, groups of 256, packed two per
    byte); the refresh is lazy (a layer whose top singular vector keeps still, mean |cos| ≥ 0.4 over
    5 refreshes, doubles its gap); the moments are blockwise INT8. For INT8 weights, quantize the
    model first and build the groups from it::

        lro.quantize_model_int8(model)
        opt = lro.QGaLoreAdamW(lro.param_groups(model, rank=256), lr=0.01)

    Each step dequantizes one weight, applies the update in float32 and requantizes it with
    stochastic rounding (no full-precision master copy). Paper settings are GaLore's (scale 0.25,
    gap 200 before the lazy schedule stretches it).

    Departures from q-galore-torch (README, "q-galore-torch 1.0"; its projector and lazy schedule are held to
    ours in ``tests/test_parity_q_galore.py``): its INT4 zero point is an integer code clamped into [0, 15]
    (0 on the grid, a group's extremes may fall off it, one-sign groups are clipped); ours is the group's
    float minimum (both extremes on the grid), so the INT4 bases differ. Its lazy refresh averages the signed
    cosine of the top vectors, ours |cos| (a singular vector's sign is arbitrary). Its keys ``quant``,
    ``cos_threshold``, ``gamma_proj`` are read as ``proj_bits``, ``lazy_threshold``, ``lazy_growth``.
    """

    preset = {**GaLoreAdamW.preset, "proj_bits": 4, "refresh": "lazy", "state_bits": 8}


class APOLLO(LowRankAdamW):
    """APOLLO: AdamW's scaling estimated per channel in a random projection (Zhu et al. 2025).

    "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, arXiv:2412.05270. Adam runs on
    R = project(G) with a Gaussian N(0, 1/r) projection regenerated from a per-parameter seed (only
    the seed is kept) and redrawn every ``update_proj_gap`` steps; the update is the raw gradient
    scaled per channel by s = ‖N‖/‖R‖, limited to a norm growth of 1.01 per step, times √scale.
    Paper settings: rank 256 (a quarter of the hidden size), scale 1, gap 200, lr 0.01.

    Departures from apollo-torch 1.0.3, each tested: the scale factors come from the bias-corrected
    N = M̂/(√V̂ + ε) as in the paper's algorithm (apollo-torch computes them from the uncorrected
    moments and applies the bias correction after the limiter, so its limiter also clips the
    bias-correction warm-up); channels follow the projected side, not the matrix's shape; weight decay
    uses the pre-update weights; the ratio is float32 and a channel whose projected gradient is exactly
    zero gets 0 (1/1e-8 would overflow a float16 weight into inf, and 0·inf into NaN).
    """

    preset = {"projector": "random", "scaling": "channel", "limiter": 1.01, "scale": 1.0, "update_proj_gap": 200}


class APOLLOMini(LowRankAdamW):
    """APOLLO-Mini: APOLLO with a rank-1 projection and one scale factor per tensor (Zhu et al. 2025).

    SGD-level memory: two 1×n (or m×1) moments and a seed per weight. A group that asks for low rank
    without a number (``lro.param_groups(model)``, ``rank="auto"``) gets rank 1. Paper settings: rank 1,
    scale 128 (the update is multiplied by √128, as apollo-torch does), gap 200, lr 0.01.

    Departure, for narrow models: the default ``scale="auto"`` is the paper's 128 from width 512 (its
    LLaMA-60M) up and 128·d/512 below it (d the weights' short side: 32 at width 128). The rank-1 update
    is about √(scale/d) times an AdamW step's size, 0.5 at the paper's 60M; 128 at width 128 makes it 1.0,
    which at lr 0.01 is a step AdamW cannot take (llama_tiny, 300 steps: held-out 2.250 with 128, 1.862
    with 32; README, "Defaults and tuning"). A number given as ``scale`` is used as it is.
    """

    default_rank = 1

    @staticmethod
    def width_scale(short_side: int) -> float:
        """``scale="auto"``: 128 from width 512 up, 128·d/512 below (the paper's 60M step relative to AdamW's)."""
        return 128.0 * min(1.0, short_side / 512) if short_side > 0 else 128.0

    preset = {"projector": "random", "scaling": "tensor", "limiter": 1.01, "scale": "auto", "update_proj_gap": 200}


class FRUGAL(LowRankAdamW):
    """FRUGAL: state-full Adam in a subspace, state-free signSGD on the rest (Zmushko et al. 2025).

    "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
    arXiv:2411.07837. Every ``update_proj_gap`` steps a new subspace is chosen (SVD by default, as the
    paper's GaLore-style variant; ``projector="sparse"`` selects the columns of largest norm, close to
    the paper's column selection; ``rsvd`` and ``dct`` also serve; density ρ is rank / min(m, n));
    Adam runs in it, restarted at each new subspace (moments zeroed and the bias correction counted
    from the new subspace's first step, as FRUGAL's code sets its Adam's step to 0); the residual
    G − project_back(project(G)) is applied as −lr·residual_lr_scale·sign(residual). A residual channel
    that is round-off (a gradient column or row inside the subspace: below ~1e-5 of its norm in float32)
    gets no step, where sign() would make it ±lr. The residual needs an orthonormal basis, so
    ``projector="random"`` (Gaussian, not semi-orthogonal) is refused.

    ``match_adamw_rms=True`` sets ``residual_lr_scale`` to 0.2 as well as ``scale`` (unless it is given):
    sign() moves every entry by lr, about 5x an AdamW step's RMS, and the residual is most of the weight.
    The paper's signSGD takes the run's lr as it is, which is this class's default (1.0).

    Schedule: FRUGAL's code renews every weight's subspace on the same step; ours (``stagger=True``, the
    package's default) spreads the weights' renewals over the gap, so with two or more weights the runs
    differ from the first renewal on. ``stagger=False`` gives the official schedule, and with it the
    official update to float64 round-off (4e-16 over 8 steps, measured by a QA pass).
    """

    preset = {"projector": "svd", "residual": "sign", "residual_lr_scale": 1.0, "on_refresh": "reset",
              "scale": 1.0, "update_proj_gap": 200}


class Fira(LowRankAdamW):
    """Fira: GaLore plus the residual, scaled per channel by the subspace's Adam ratio (Chen et al. 2024).

    "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?", arXiv:2410.01623.
    R = project(G), N = Adam(R), k = ‖N‖/‖R‖ per channel, S = G − project_back(R); the update is
    scale·(project_back(N) + limit(k·S)) with the norm-growth limiter (γ = 1.01) on the scaled
    residual.

    Departure from the fira package, tested: its residual subtracts scale·project_back(R), which is
    the true residual only when scale = 1; we subtract project_back(R) and apply scale to the whole
    update as the paper writes it. As for APOLLO, k comes from the bias-corrected N.
    """

    preset = {"projector": "svd", "residual": "fira", "limiter": 1.01, "scale": 1.0, "update_proj_gap": 200}


class GaLoreAdafactor(GaLoreAdamW):
    """GaLore with the factored Adafactor rule in the subspace (Zhao et al. 2024; Shazeer & Stern 2018).

    GaLore's SVD projection, refresh and scale, with Adafactor instead of Adam on R: the second moment
    is factored into row and column statistics (r + n floats for an r×n low-rank tensor instead of
    Adam's 2·r·n), updates are clipped to an RMS of ``clip_threshold`` (1), there is no first moment
    unless ``momentum`` (β₁) is given, and no relative step (the step is ``lr·scale``, as GaLore runs
    transformers' Adafactor with ``relative_step=False``). The group's plain parameters (embeddings,
    head, norms) get Adafactor too, factored when 2-D, so nothing keeps Adam's two full moments. GaLore
    ships this pairing as ``GaLoreAdafactor``; the rule follows ``torch.optim.Adafactor`` apart from the
    relative step (``lro.rules.adafactor``).
    """

    preset = {**GaLoreAdamW.preset, "rule": "adafactor"}


class SUMO(LowRankAdamW):
    """SUMO: the momentum of a low-rank subspace, orthogonalized by an exact SVD (Refael et al. 2025).

    "SUMO: Subspace-Aware Moment-Orthogonalization for Accelerating Memory-Efficient LLM Training",
    NeurIPS 2025, arXiv:2505.24749. Every ``update_proj_gap`` steps the subspace is refreshed by a
    randomized SVD of the gradient (``rsvd``) and the momentum is rotated into it (``on_refresh=
    "rotate"``: M ← Q_newᵀ Q_old M); each step M ← μM + (1 − μ)R on the projected gradient, the update
    is the orthogonal factor U Vᵀ of M from its exact SVD, scaled by 0.2·√max(r, n) so that its RMS is
    Adam's (``lro.rules.orthogonal``), projected back, times ``lr·scale``, with decoupled weight decay.
    State per m×n weight: one r×n momentum and the r×n basis, half of GaLore-Adam's moments.
    Embeddings, head, norms and biases are stepped by AdamW, as Muon and SUMO do.

    Settings: μ = 0.95 and Muon's RMS matching, so GaLore's learning rate and scale carry over (lr
    0.01, scale 0.25, gap 200); ``orthogonalize="newton_schulz"`` swaps the SVD for Muon's iteration.
    """

    preset = {"projector": "rsvd", "rule": "orthogonal", "on_refresh": "rotate", "momentum": 0.95,
              "orthogonalize": "svd", "scale": 0.25, "update_proj_gap": 200}


class COAP(LowRankAdamW):
    """COAP: Adam in a subspace moved by a correlation-aware SGD step every 32 steps (Xiao et al. 2025).

    "COAP: Memory-Efficient Training with Correlation-Aware Gradient Projection", CVPR 2025,
    arXiv:2412.00071 (official code: bytedance/coap). The basis P starts from a randomized range finder
    of the first gradient; every ``update_proj_gap`` (T_u = 32) steps it takes one SGD step (lr 0.1,
    gradient clipped to norm 1) on MSE(G PᵀP, G)·(1 − mean row cos(M P, G)), M the Adam first moment,
    and every ``reproject_factor``-th (λ = 5) of those refreshes is instead one pass of randomized
    subspace iteration warm-started from P (``lro.projectors.coap``). The moments are kept across
    refreshes (the official ``restore_state=False``, its setting for LLaMA), the residual dropped.

    Settings: T_u 32 and λ 5 (the official optimizer's defaults) and scale 0.25; its LLaMA-1B recipe
    trains at rank 512, lr 0.01, T_u 40, the 7B one at rank 1024, lr 0.005, T_u 100 (the constructor keeps
    torch AdamW's lr 1e-3 and weight decay 0.01 unless given; the recipes use weight decay 0). ``projector_options`` take
    ``reproject_factor``, ``lr`` and ``max_norm`` of the P step. Departures from the official code (P in
    float32, canonical singular-vector signs, per-weight seeds, the re-SVD counted per weight) are listed
    in ``lro.projectors.coap``; as for every preset, ε sits on √V̂ and weight decay is taken from the
    weights before the update (the official AdamW: ε 1e-6 on √V, decay after the update).
    """

    preset = {"projector": "coap", "scale": 0.25, "update_proj_gap": 32}


class GWT(LowRankAdamW):
    """GWT: Adam on the Haar approximation of the gradient, its details stepped without state (Wen et al. 2025).

    "GWT: Scalable Optimizer State Compression for Large Language Model Training", arXiv:2501.07237
    (official code: zqOuO/GWT, ``WaveAdamW``). Each projected weight's gradient is transformed along its
    last axis (``proj_type="right"``, as the official code) by a level-2 orthonormal Haar transform
    (``projector="haar"``, fixed: never refreshed, n/4 coefficients per row); Adam runs on the
    approximation coefficients, the detail coefficients are divided by the approximation's Adam
    denominator (each by its block's) with no state, Fira's norm-growth limiter (γ = 1.01) bounds the
    step, and the inverse transform times ``scale`` (0.25) is the update (``residual="gwt"``,
    ``lro.updates.gwt``). ``projector_options={"level": l}`` keeps n/2^l coefficients (2^l-fold less
    moment memory than AdamW on those weights). Widths that 2^l does not divide are zero-padded, as the
    official code's default boundary.

    Settings of the official LLaMA scripts (60M–1B): level 2, scale 0.25, lr 0.01, weight decay 0 (lr and
    weight decay are not the constructor's defaults, which are torch AdamW's 1e-3 and 0.01: give them), and
    the official ε, 1e-6 (the only preset whose default ε is not torch's 1e-8): the details are divided by
    √V̂ + ε, and where an approximation coefficient is near 0 (a block whose entries cancel) ε is what
    bounds their step; with 1e-8 a float16 model overflows in a few steps at lr 0.01 without warmup. The
    group's ``rank`` only chooses which weights are projected (a short side above it). As for every
    preset, ε sits on √V̂ and weight decay is taken from the weights before the update (the official
    WaveAdamW: ε on √V, decay after the update).
    """

    preset = {"projector": "haar", "proj_type": "right", "residual": "gwt", "limiter": 1.01, "scale": 0.25}

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, *args, **kwargs)


class Grass(LowRankAdamW):
    """Grass: Adam on r sampled rows of the gradient, rescaled to be unbiased (Muhamed et al. 2024).

    "Grass: Compute Efficient Low-Memory LLM Training with Structured Sparse Gradients", arXiv:2406.17660.
    The projection is sparse, Pᵀ = ρB (``projector="sparse"``, ``lro.projectors.sparse``): every
    ``update_proj_gap`` steps r rows (columns, on the ``std`` side) are drawn with probability ∝ their squared
    norm, with replacement, and scaled by ρ_jj = 1/√(r·q_j), so E[P Pᵀ] = I; Adam runs on R = Pᵀ G, its moments
    reset at each new selection (``on_refresh="reset"``), and W ← W − lr·scale·P·N. ``selection=`` (a group
    key here; ``projector_options={"selection": ...}`` for any preset with ``projector="sparse"``) takes
    ``"topr"`` (deterministic, ρ = 1), ``"multinomial_norepl"`` or ``"uniform"``; another ``projector=`` ignores it.
    :func:`lowrank_optim.sparse_grad` gives Grass's sparse backward: each projected ``nn.Linear`` computes
    only the r selected rows (columns) of its weight gradient.

    Settings: gap 200, scale 0.25 and the lr of GaLore (0.01), which the paper's pretraining runs share with
    the GaLore baseline; rank as GaLore's. The official repository (aashiqmuhamed/GRASS) publishes no code,
    so this follows the paper's formulas; ε on √V̂ and decoupled weight decay from the pre-update weights as
    every preset.
    """

    preset = {"projector": "sparse", "selection": "multinomial", "on_refresh": "reset", "scale": 0.25,
              "update_proj_gap": 200}


class GoLore(GaLoreAdamW):
    """GoLore: GaLore, then random orthonormal projections for the end of training (He et al. 2025).

    "Subspace Optimization for Large Language Models with Convergence Guarantees", ICML 2025 (official
    code pkumelon/Golore). GaLore's SVD subspace until the first refresh at or after ``switch_step``,
    then a fresh random Stiefel basis at every refresh (``projector="golore"``,
    ``lro.projectors.golore``): with small batches GaLore's SVD subspace can stall while the random
    one converges. Give ``projector_options={"switch_step": int(rand_ratio * total_steps)}`` (the
    official ``rand_ratio`` is 0.8: SVD for the first 80% of the steps); ``"before"`` chooses another
    first projector. GaLore's other settings (scale 0.25, gap 200). Departure: the official optimizer
    rotates the first moment into each new basis and keeps the second as it is; here the moments are
    kept (``on_refresh="keep"``, GaLore's) or both rotated (``on_refresh="rotate"``).
    """

    preset = {**GaLoreAdamW.preset, "projector": "golore"}

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            opts = group.get("projector_options") or {}
            if group.get("rank") is not None and group.get("projector") == "golore" and "switch_step" not in opts:
                raise ValueError("GoLore needs projector_options={'switch_step': int(rand_ratio * total_steps)} "
                                 "(rand_ratio 0.8 in the paper): the step from which it projects at random")


class OnlineSubspaceDescent(LowRankAdamW):
    """Online Subspace Descent: Adam in a subspace that an optimizer of its own moves every step, no SVD
    after the first (Liang et al. 2024, "Memory-Efficient LLM Training with Online Subspace Descent",
    arXiv:2408.12857; official code kyleliang919/Online-Subspace-Descent, ``--proj_type continuous``).

    GaLore's step (Adam on R = project(G), the update scale · project_back(N), the residual dropped, moments
    kept) with ``projector="online_pca"``: P starts from the first gradient's SVD, and once each step has
    used it, takes one step of ``pca_optimizer`` (AdamW, lr 1/``update_proj_gap`` following the weight lr's
    schedule, weight decay 0.01: the official default) on the PCA loss ‖Ĝ PᵀP − Ĝ‖², Ĝ = G/‖G‖
    (``lro.projectors.online_pca``). ``projector_options={"pca_optimizer": "adam8bit"}`` is the official
    7B recipe's P optimizer (also ``lion``, ``adafactor``, ``sgd``).

    Settings of the official LLaMA scripts (GaLore's; their lr and weight decay 0 are given, the constructor's
    defaults being torch AdamW's): lr 0.01, scale 0.25, gap 200 (so P's lr is 0.005),
    rank 128 for 60M; 7B: rank 1024, gap 500, lr 0.005, 8-bit Adam for the weights and ``adam8bit`` for P.
    Departures from the official code (P and its optimizer state in float32, canonical singular-vector
    signs) are listed in ``lro.projectors.online_pca``; as for every preset, ε sits on √V̂ and weight decay
    is taken from the weights before the update (the official GaLore AdamW: ε on √V, decay after it).
    """

    preset = {"projector": "online_pca", "scale": 0.25, "update_proj_gap": 200}


class DCTAdamW(LowRankAdamW):
    """DCT-AdamW: Adam on r columns of a fixed DCT basis chosen by the gradient, with error feedback
    (Modoranu et al. 2025, "SVD-free low-rank adaptive gradient optimization for large language models",
    arXiv:2505.17967; official code: ``ista_daslab_optimizers.DCTAdamW``, IST-DASLab/ISTA-DASLab-Optimizers).

    Each step (``update_proj_gap=1``, the official default) the r basis vectors most aligned with
    A = G + E are chosen from the official default basis (``dct_variant="matmul"``, a group key here, which
    ``projector_options={"dct_variant": ...}`` overrides: the DCT-III vectors, scored by the ℓ1 norms of the
    columns of A·Dᵀ; ``"makhoul"``: the DCT-II vectors by FFT, ``lro.projectors.dct``); Adam runs on R = project(A),
    the update is lr·project_back(N) (scale 1: the official code has none), and what the subspace drops,
    E ← A − project_back(R), is fed back into the next gradient (``residual="error_feedback"``,
    ``ef_bits`` 32, 8 or 4: ``lro.updates.error_feedback``). The moments are kept in their slots across
    refreshes (the official ``rotate_subspace=False``); ``on_refresh="rotate"`` maps them into the new
    basis (its ``rotate_subspace=True``: M ← M·Rot, V ← |V·Rot|). Weights with a dimension of 32000 or
    more (embeddings, output heads) are stepped by AdamW (``max_dim``, its ``max_shape``). The state per
    m×n weight is Adam's two moments of R, r int64 indices and E (m·n floats, or 1 or 0.5 bytes each).

    Departures from the official code: error feedback is on by default (the method of the paper; the
    official constructor's ``use_ef`` defaults to False); the refresh schedule is the package's (at the
    first step, then every ``update_proj_gap`` steps; the official one refreshes at steps 1 and the
    multiples of the gap, the same at its default gap of 1); the indices are sorted ascending and each
    layer size has its own basis (``lro.projectors.dct``); the moments and an unquantized E are float32
    (the official ones take the weight's dtype); its ``q_ef=8`` quantizer has 15 levels, ours 256
    (``lro.updates.error_feedback``); its ``ell_norm`` other than 1 and its Hadamard and random-QR bases
    are not offered. As for every preset, weight decay is taken from the weights before the update,
    which is also what the official code does.
    """

    preset = {"projector": "dct", "dct_variant": "matmul", "residual": "error_feedback", "scale": 1.0,
              "update_proj_gap": 1, "max_dim": 32000}


class Trion(LowRankAdamW):
    """Trion: Dion's low-rank orthonormal update with the subspace chosen as r DCT columns
    (Modoranu et al. 2025, arXiv:2505.17967; official code ``ista_daslab_optimizers`` ``Trion``,
    IST-DASLab/ISTA-DASLab-Optimizers; Dion: Ahn et al. 2025, arXiv:2504.05295, microsoft/dion).

    Per m×n weight it keeps a full momentum M (the error-feedback buffer E, ``ef_momentum`` μ = 0.95) and
    does, every step (``update_proj_gap=1``)::

        A = M + G                                   the official M.add_(G)
        idx = top-r ℓ1 norms of the columns of A·D (right, m ≥ n) or the rows of D·A (left), D its
                                                    ``dct3_matrix`` (``dct_variant="trion"``, ``lro.projectors.dct``)
        m = A·D[:, idx] (right) or D[idx, :]·A (left)                      R = project(A)
        M ← A − (1 − μ)·project_back(m)             error feedback on the momentum (``lro.updates.error_feedback``)
        W ← (1 − lr·wd)·W − lr·scale·0.2·√max(m, n)·project_back(NS₅(m))

    NS₅ is Muon's quintic Newton–Schulz iteration (5 steps, coefficients (3.4445, −4.775, 2.0315), bfloat16:
    the official ``zeropower_via_newtonschulz5``), run by the ``orthogonal`` rule with its own momentum off
    (``momentum=0``: the momentum is M, before the projection). ``momentum=`` given to the constructor is
    Trion's μ (the official key) and sets ``ef_momentum``. Weights with a side of 32000 or more (embeddings,
    heads; ``max_dim``) and every other parameter are stepped by AdamW, as the official ``use_muon=False``
    groups. State per m×n weight: M (m·n floats), the orthogonal rule's r×n (m×r) buffer, r int64 indices.

    Departures from the official code: its scale is ``scaling_type`` (no default; ``"kimi"`` =
    0.2·√max(m, n), ``"kj"``, ``"dion"``, ``"none"``): here the orthogonal rule's RMS matching, which is
    ``"kimi"``, times ``scale`` (1); its lr default (0.02) belongs to the unscaled variants, so the lr is the
    package's (1e-3; the CLI uses SUMO's, the same RMS-matched rule). Its AdamW groups have their own lr, betas
    (0.9, 0.95) and ε 1e-10; here the group's. The indices are sorted ascending (permuting m's columns permutes
    NS₅'s output the same way). The official step needs an initialized ``torch.distributed`` and refers to
    two names its module does not define (``device``/``dtype`` on a DCT-cache miss, ``get_dct_matrix``), which
    its parity test supplies (README, "ista-daslab-optimizers 1.1.15 (Trion)"). On FSDP2 row shards the
    ``dct`` projector takes the right side only (``proj_type="right"``); Trion is not tested there.
    """

    preset = {"projector": "dct", "dct_variant": "trion", "residual": "error_feedback", "ef_momentum": 0.95,
              "rule": "orthogonal", "momentum": 0.0, "orthogonalize": "newton_schulz", "ns_steps": 5,
              "scale": 1.0, "update_proj_gap": 1, "max_dim": 32000}

    def __init__(self, params: Any, *args: Any, momentum: float | None = None, **kwargs: Any) -> None:
        if momentum is not None:
            kwargs["ef_momentum"] = momentum
        super().__init__(params, *args, **kwargs)
        for i, group in enumerate(self.param_groups):
            if isinstance(group.get("momentum"), bool) or group.get("momentum") != 0:
                raise ValueError(f"Trion param group {i}: invalid momentum={group['momentum']!r}: Trion's momentum "
                                 "is the full-rank buffer, set it with ef_momentum= in a group (or momentum= "
                                 "to the constructor); the orthogonal rule's own momentum stays 0")
