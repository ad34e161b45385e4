"""Entropic optimal transport between a large candidate cloud and a small target cloud, streamed.

One component serves LAVA, GOT-D and (later) Projektor: log-domain Sinkhorn returning both dual potentials
and the calibrated gradients of the OT value with respect to each candidate's mass.

Problem: candidates x (N rows, weights a), targets y (M rows, weights b, M small), ground cost
``C_ij = cost_scale * ||x_i - y_j||^2`` plus, when labels are given, ``label_cost[lx_i, ly_j]``. Potentials
follow geomloss / ott-jax: the plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` and

    f_i = -eps LSE_j(log b_j + (g_j - C_ij) / eps)        g_j = -eps LSE_i(log a_i + (f_i - C_ij) / eps)

Why our own and not POT or geomloss (both are test oracles / alternatives here):
- memory: one pass over candidate blocks computes the block's costs once (``||x||^2 + ||y||^2 - 2 x y^T``, a
  matmul on the accelerator), its f from the current g, and folds the block into a running column
  log-sum-exp that becomes the next g. Memory is O(block x M) whatever N is; POT's lazy
  ``empirical_sinkhorn`` is NumPy on the host, geomloss's tensorised backend holds N x M and its online
  backend needs pykeops (a CUDA/C++ compiler at run time).
- cost: a pool of millions is warm-started from the solution on a seeded subsample of the candidates (the
  same distribution, so its g is close), and the full passes only refine it. Each pass measures the target
  marginal's L1 error of the plan it used, so convergence is known without an extra pass.

Calibrated gradient (LAVA; GOT-D): the derivative of the OT value with respect to candidate i's mass when
the masses are constrained to sum to one, ``v_i = f_i - sum_{j != i} f_j / (N - 1) = N/(N-1) (f_i - mean f)``.
Higher = moving mass onto i raises the distance to the target (LAVA: more harmful); lower = lowers it
(GOT-D selects the most negative first).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from mates_megatron.progress import progress as progress_bar


@dataclass
class SinkhornConfig:
    """Options of the streamed Sinkhorn solver."""

    epsilon: float = 0.1
    """Entropic regularisation, absolute (in cost units; GOT-D uses 0.1 on squared distances)."""
    cost_scale: float = 1.0
    """Multiplies the squared Euclidean distance (LAVA's 1/2: 0.5; GOT-D's plain squared distance: 1)."""
    max_iter: int = 1000
    """Full passes over the candidates at most."""
    tol: float = 1e-3
    """Stop when the plan's target marginal is within this L1 error (ott-jax's threshold criterion)."""
    block_size: int = 16384
    """Candidates per block: memory is O(block_size x targets)."""
    warm_start: int = 65536
    """Above this many candidates, first solve on a seeded subsample of this size and start from its g
    (0: never)."""
    seed: int = 0
    """Seed of the warm-start subsample."""
    momentum: float = 1.0
    """Over-relaxation of the g update, in [1, 2): 1 is plain Sinkhorn; ott-jax's GOT-D setting is 1.3. It
    changes the path, not the fixed point."""
    dtype: str = "float32"
    """Compute dtype: 'float32' (default; accumulations of the log-sum-exp stay stable in the log domain) or
    'float64' (tests against exact solvers)."""
    device: str | None = None
    """Where the blocks are computed (None: CUDA if available, else CPU)."""
    progress: bool = False
    """A progress bar over the passes."""

    def __post_init__(self) -> None:
        if not 1.0 <= self.momentum < 2.0:
            raise ValueError(f"SinkhornConfig.momentum={self.momentum} must be in [1, 2) (1: plain Sinkhorn)")
        if not self.epsilon > 0:
            raise ValueError(f"SinkhornConfig.epsilon={self.epsilon} must be > 0 (e.g. 0.1)")
        if not self.cost_scale > 0:
            raise ValueError(f"SinkhornConfig.cost_scale={self.cost_scale} must be > 0 (1, or 0.5 for LAVA)")
        if self.max_iter < 1:
            raise ValueError(f"SinkhornConfig.max_iter={self.max_iter} must be >= 1")
        if not self.tol > 0:
            raise ValueError(f"SinkhornConfig.tol={self.tol} must be > 0 (e.g. 1e-3)")
        if self.block_size < 1:
            raise ValueError(f"SinkhornConfig.block_size={self.block_size} must be >= 1")
        if self.warm_start < 0:
            raise ValueError(f"SinkhornConfig.warm_start={self.warm_start} must be >= 0 (0: never)")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"SinkhornConfig.dtype={self.dtype!r} must be 'float32' or 'float64'")


@dataclass
class OTResult:
    """The solution: potentials (float64 NumPy), the entropic OT value and how the solve went."""

    f: np.ndarray
    """Candidate potentials [N] (the c-transform of ``g``)."""
    g: np.ndarray
    """Target potentials [M]."""
    value: float
    """Dual objective ``sum a f + sum b g`` (the entropic OT value at convergence)."""
    iterations: int
    """Full passes over the candidates (the warm start's passes not counted)."""
    marginal_error: float
    """L1 error of the target marginal of the plan of the last pass."""
    converged: bool
    """``marginal_error <= tol``."""
    seconds: float

    @property
    def calibrated(self) -> np.ndarray:
        """The calibrated gradient of every candidate (see the module docstring)."""
        return calibrated_gradient(self.f)


def calibrated_gradient(f: np.ndarray) -> np.ndarray:
    """``v_i = f_i - sum_{j != i} f_j / (N - 1)``: the gradient of the OT value in candidate i's mass with
    the total mass held at one."""
    f = np.asarray(f, dtype=np.float64)
    n = len(f)
    if n < 2:
        raise ValueError(f"the calibrated gradient needs at least 2 candidates, got {n}")
    return n / (n - 1) * (f - f.mean())


_TINY = 1e-300


def _device(cfg: SinkhornConfig) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_rows(x, name: str) -> np.ndarray | torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)  # a memory map stays one: its blocks are read (and checked) as they are used
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [rows, dim] array, got shape {tuple(x.shape)}")
    return x


def _check_finite(t: torch.Tensor, name: str, lo: int = 0) -> None:
    if not torch.isfinite(t).all():
        row = lo + int((~torch.isfinite(t)).any(1).nonzero()[0])
        raise ValueError(
            f"{name} has NaN or infinite entries (row {row}): fix the embeddings before transport"
        )


def _weights(w, n: int, name: str) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"{name} must be {n} positive finite weights, got shape {w.shape}")
    return w / w.sum()


def _labels(lab, n: int, name: str, rows: int | None) -> np.ndarray | None:
    if lab is None:
        return None
    lab = np.asarray(lab)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{name} must be {n} integer labels, got shape {lab.shape} dtype {lab.dtype}")
    if rows is not None and n and (lab.min() < 0 or lab.max() >= rows):
        raise ValueError(f"{name} must lie in [0, {rows}) (the label_cost rows/columns)")
    return lab


class _Stream:
    """The blocks of one problem on the compute device (targets resident, candidates moved per block)."""

    def __init__(self, x, y, cfg, label_cost, x_labels, y_labels) -> None:
        self.dev, self.dtype = _device(cfg), getattr(torch, cfg.dtype)
        self.x, self.cfg = x, cfg
        self.y = torch.as_tensor(y).to(self.dev, self.dtype)
        _check_finite(self.y, "targets y")
        self.y2 = (self.y * self.y).sum(1)
        self.lc = None if label_cost is None else torch.as_tensor(label_cost).to(self.dev, self.dtype)
        self.xl = None if x_labels is None else torch.as_tensor(x_labels, dtype=torch.long)
        self.yl = None if y_labels is None else torch.as_tensor(y_labels, dtype=torch.long).to(self.dev)

    def block(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The block's candidates on the device, their scaled squared norms and their labels."""
        xb = torch.as_tensor(self.x[lo:hi]).to(self.dev, self.dtype)
        _check_finite(xb, "candidates x", lo)
        xl = None if self.xl is None else self.xl[lo:hi].to(self.dev)
        return xb, self.cfg.cost_scale * (xb * xb).sum(1), xl

    def logits(self, xb: torch.Tensor, xl: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
        """``(shift_j - C_ij) / eps`` without the row term ``s ||x_i||^2 / eps`` (it cancels in the row
        normalisation; callers add it back to f): one fused matmul, the label cost added when labelled."""
        s, eps = self.cfg.cost_scale, self.cfg.epsilon
        bias = (shift - s * self.y2) / eps
        z = torch.addmm(bias[None, :], xb, self.y.T, beta=1.0, alpha=2.0 * s / eps)
        if self.lc is not None:
            z -= self.lc[xl][:, self.yl] / eps
        return z


def sinkhorn(
    x,
    y,
    cfg: SinkhornConfig | None = None,
    *,
    a=None,
    b=None,
    label_cost=None,
    x_labels=None,
    y_labels=None,
    g_init: np.ndarray | None = None,
) -> OTResult:
    """Entropic OT between candidates ``x`` [N, d] and targets ``y`` [M, d] (NumPy or torch; ``x`` may be
    a memory map: it is read block by block). ``a``, ``b``: weights (None: uniform). ``label_cost`` [K, L]
    with integer ``x_labels`` [N] in [0, K) and ``y_labels`` [M] in [0, L) adds a label term to the cost
    (LAVA's labelled mode). ``g_init``: starting target potentials (else the warm start, else zeros)."""
    cfg = cfg or SinkhornConfig()
    t0 = time.perf_counter()
    x, y = _as_rows(x, "candidates x"), _as_rows(y, "targets y")
    n, m = x.shape[0], y.shape[0]
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"candidates have dimension {x.shape[1]}, targets {y.shape[1]}: embed both alike")
    if (label_cost is None) != (x_labels is None) or (label_cost is None) != (y_labels is None):
        raise ValueError("labelled transport needs label_cost, x_labels and y_labels together")
    k_rows = l_cols = None
    if label_cost is not None:
        label_cost = np.asarray(label_cost, dtype=np.float64)
        if label_cost.ndim != 2 or not np.isfinite(label_cost).all():
            raise ValueError(f"label_cost must be a finite [K, L] matrix, got shape {label_cost.shape}")
        k_rows, l_cols = label_cost.shape
    x_labels = _labels(x_labels, n, "x_labels", k_rows)
    y_labels = _labels(y_labels, m, "y_labels", l_cols)
    a_np, b_np = _weights(a, n, "candidate weights a"), _weights(b, m, "target weights b")
    if g_init is None and cfg.warm_start and n > cfg.warm_start:
        rng = np.random.default_rng([cfg.seed, 0x07])
        sub = np.sort(rng.choice(n, size=cfg.warm_start, replace=False))
        warm = sinkhorn(
            x[sub] if not isinstance(x, torch.Tensor) else x[torch.as_tensor(sub)],
            y,
            replace(cfg, warm_start=0, progress=False),
            a=a_np[sub],
            b=b_np,
            label_cost=label_cost,
            x_labels=None if x_labels is None else x_labels[sub],
            y_labels=y_labels,
        )
        g_init = warm.g
    s = _Stream(x, y, cfg, label_cost, x_labels, y_labels)
    eps, dev, dt = cfg.epsilon, s.dev, s.dtype
    log_a = torch.as_tensor(np.log(a_np), dtype=dt)
    log_b = torch.as_tensor(np.log(b_np), dtype=dt, device=dev)
    g = torch.zeros(m, dtype=dt, device=dev) if g_init is None else torch.as_tensor(g_init).to(dev, dt)
    f = torch.empty(n, dtype=dt)
    err, it = math.inf, 0
    bar = progress_bar(total=cfg.max_iter, desc="sinkhorn", disable=not cfg.progress, leave=False)
    b_exact = torch.as_tensor(b_np, device=dev)  # float64: the marginal sums are accumulated in it
    for it in range(1, cfg.max_iter + 1):
        # One pass: every block's f from the current g, then the plan's target marginal from the same
        # exponentials (one exp per cost entry: P_ij = a_i E_ij / sum_j E_ij with E the row-stabilised
        # kernel), which gives the next g in closed form.
        shift = g + eps * log_b
        marginal = torch.zeros(m, dtype=torch.float64, device=dev)
        for lo in range(0, n, cfg.block_size):
            hi = min(lo + cfg.block_size, n)
            xb, x2, xl = s.block(lo, hi)
            z = s.logits(xb, xl, shift)  # log b_j + (g_j - C_ij) / eps + x2_i / eps
            zmax = z.amax(dim=1, keepdim=True)
            e = z.sub_(zmax).exp_()
            rowsum = e.sum(dim=1)
            f[lo:hi] = (x2 - eps * (zmax.squeeze(1) + rowsum.log())).cpu()
            w = log_a[lo:hi].to(dev).exp() / rowsum
            marginal += (w @ e).double()
        # The plan (f, g) has target marginal ``marginal``: its L1 error, and the g that makes it exact.
        err = float((marginal - b_exact).abs().sum())
        bar.update(1)
        bar.set_postfix(err=f"{err:.2e}")
        if err <= cfg.tol or it == cfg.max_iter:
            break  # f is the c-transform of this g: return the pair the error was measured on
        # A target that got (numerically) no mass moves by at most TINY's worth rather than to infinity.
        step = eps * (marginal.clamp(min=_TINY) / b_exact).log()
        g = g - cfg.momentum * step.to(dt)
    bar.close()
    f64, g64 = f.double().numpy(), g.double().cpu().numpy()
    value = float(a_np @ f64 + b_np @ g64)
    return OTResult(f64, g64, value, it, err, err <= cfg.tol, time.perf_counter() - t0)


def sinkhorn_divergence(x, y, cfg: SinkhornConfig | None = None) -> float:
    """The debiased ``OT(x, y) - (OT(x, x) + OT(y, y)) / 2`` (>= 0, zero for equal clouds): the distance
    between two small clouds (LAVA's label distances, GOT-D's domain screening)."""
    cfg = cfg or SinkhornConfig()
    return sinkhorn(x, y, cfg).value - 0.5 * sinkhorn(x, x, cfg).value - 0.5 * sinkhorn(y, y, cfg).value
