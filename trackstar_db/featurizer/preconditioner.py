"""The preconditioner R: the autocorrelation of projected, corrected gradients, and its powers.

R_train = mean g g^T over training vectors, R_eval the same over query vectors, accumulated in
float64 while streaming batches. R is block-diagonal over `spans` (the layout's blocks, default
for combine="concat") or dense (one span [0, d)). The task-specific mix is
R = lambda R_eval + (1 - lambda) R_train with lambda from the spectrum-crossing rule:
sort the eigenvalues of R_train and of R_eval descending (block-diagonal: the union of all
blocks' eigenvalues), take component k (0-based; default max(1, d // 64)) and set
lambda = s_train[k] / (s_train[k] + s_eval[k]). Without query vectors R = R_train (lambda 0).

Shrinkage, chosen from the data (docs/method.md, "The damping rule"): each block's estimate S
(R_train from n_train vectors, R_eval from n_eval) becomes (1 - rho) S + rho mu I, mu = trace(S)
/ size. The default rule, 'prior', is the posterior mean under a prior mu I worth one
pseudo-vector per dimension of the block (PRIOR_SAMPLES_PER_DIM): rho = size / (n + size), so
rho grows as n falls below the block size, where S's small eigenvalues are noise (with n <
size, S has size - n zero eigenvalues, which R^-1/2 would otherwise blow up to the damping's
floor). 'ledoit-wolf' takes Ledoit and Wolf's rho = min(b2, d2) / d2 for a second moment (no
centering) instead:

    d2 = |S - mu I|_F^2 = |S|_F^2 - size mu^2
    b2 = (1/n^2) sum_i |x_i x_i^T - S|_F^2 = (mean_i |x_i|^4 - |S|_F^2) / n

(GramAccumulator keeps sum_i |x_i|^4 per block beside g g^T, so this costs no second pass); it
is Frobenius-optimal for S, dominated by the large eigenvalues, and shrinks too little for
whitening (rho ~0.16 for blocks of 1,600 from 354 gradients; benchmarks/RESULTS.md).
shrinkage='none' (rho = 0) or a number in [0, 1] fixes rho instead.

Powers come from a float64 eigendecomposition with damping:
R^p = U diag((s + damping * mean(s))^p) U^T, mean(s) = trace(R) / d over the whole matrix
(all blocks). Default damping: DEFAULT_DAMPING (chosen by a sweep: docs/method.md). Saved as safetensors (eigenvalues and eigenvectors per
block, after shrinkage) with lambda, k, damping, shrinkage, the blocks' rho, n_train, n_eval,
kind and spans in the metadata; never pickled; laid out canonically (content.py), so the file's
sha256 names it by its content.
The same file may carry the whitened norms |g R^p| of every training row ("row_norms.<p>",
in the table's scan order) with the table version they belong to, so scans never apply R to
stored rows (retrieval/scoring.py).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from trackstar_db import defaults
from trackstar_db.content import canonical_safetensors, write_bytes

KINDS = ("block", "dense")
_THREADED_EIGH = 2048  # below this size one thread is faster and immune to busy-core stalls


@contextmanager
def _eigh_threads(size: int):
    """One CPU thread for small eigendecompositions: multi-threaded LAPACK on blocks of a few
    hundred rows spends its time in thread barriers, worst when another process keeps a core busy."""
    previous = torch.get_num_threads()
    if size < _THREADED_EIGH:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
DEFAULT_DAMPING = defaults.DAMPING  # chosen by benchmarks/sweep_preconditioner.py on the demo world


SHRINKAGES = ("prior", "ledoit-wolf", "none")
DEFAULT_SHRINKAGE = "prior"
PRIOR_SAMPLES_PER_DIM = 1.0  # the prior's weight: pseudo-vectors per dimension of a block (docs/method.md)


class GramAccumulator:
    """Streaming mean of g g^T per span, float64, and sum |g|^4 per span (Ledoit-Wolf's rho).
    update(x [batch, d]); merge(other) adds another's sums (partial sums of other workers)."""

    def __init__(self, spans: list[tuple[int, int]]):
        self.spans = list(spans)
        self.sums = [torch.zeros(size, size, dtype=torch.float64) for _, size in self.spans]
        self.fourth = [0.0 for _ in self.spans]
        self.n = 0

    def merge(self, other: "GramAccumulator") -> None:
        for acc, s in zip(self.sums, other.sums):
            acc += s
        self.fourth = [a + b for a, b in zip(self.fourth, getattr(other, "fourth", [float("nan")] * len(self.spans)))]
        self.n += other.n

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("preconditioner: a vector is not finite")
        for i, ((offset, size), acc) in enumerate(zip(self.spans, self.sums)):
            part = x[:, offset: offset + size]
            acc += part.T @ part
            self.fourth[i] += float((part.square().sum(dim=1) ** 2).sum())
        self.n += x.shape[0]

    def means(self) -> list[torch.Tensor]:
        if self.n == 0:
            raise ValueError("preconditioner: no vectors were given")
        return [s / self.n for s in self.sums]


def ledoit_wolf_rho(mean: torch.Tensor, fourth: float, n: int) -> float:
    """Ledoit-Wolf's shrinkage intensity for the second moment S = `mean` of n vectors whose
    squared norms squared sum to `fourth` (module docstring): 0 = keep S, 1 = replace it by mu I."""
    size = mean.shape[0]
    if n < 2 or not math.isfinite(fourth):
        return 1.0 if n < 2 else 0.0
    mu = float(torch.trace(mean)) / size
    frob = float((mean * mean).sum())
    d2 = frob - size * mu * mu
    if d2 <= 1e-12 * max(frob, 1e-300):  # S is already mu I
        return 0.0
    b2 = max(0.0, (fourth / n - frob) / n)
    return min(b2, d2) / d2


def prior_rho(size: int, n: int) -> float:
    """The 'prior' rule's rho for a block of `size` dimensions estimated from n vectors: the
    posterior mean of a second moment under a prior mu I worth c * size pseudo-vectors
    (c = PRIOR_SAMPLES_PER_DIM), (n S + c size mu I) / (n + c size), i.e. rho = c size / (n + c size)."""
    prior = PRIOR_SAMPLES_PER_DIM * size
    return prior / (n + prior)


def shrink(blocks: list[torch.Tensor], acc: "GramAccumulator", shrinkage) -> tuple[list[torch.Tensor], list[float]]:
    """(blocks shrunk toward mu I, rho per block) by `shrinkage`: 'prior', 'ledoit-wolf', 'none' or a fixed rho."""
    if shrinkage == "none":
        rhos = [0.0] * len(blocks)
    elif shrinkage == "prior":
        rhos = [prior_rho(b.shape[0], acc.n) for b in blocks]
    elif shrinkage == "ledoit-wolf":
        rhos = [ledoit_wolf_rho(b, f, acc.n) for b, f in zip(blocks, acc.fourth)]
    else:
        rhos = [float(shrinkage)] * len(blocks)
    out = []
    for b, rho in zip(blocks, rhos):
        if rho > 0:
            mu = float(torch.trace(b)) / b.shape[0]
            b = (1 - rho) * b + rho * mu * torch.eye(b.shape[0], dtype=b.dtype)
        out.append(b)
    return out, rhos


def check_shrinkage(shrinkage) -> None:
    if isinstance(shrinkage, str):
        if shrinkage not in SHRINKAGES:
            raise ValueError(f"shrinkage must be one of {SHRINKAGES} or a number in [0, 1], not {shrinkage!r}")
    elif not (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1):
        raise ValueError(f"shrinkage must be one of {SHRINKAGES} or a number in [0, 1], not {shrinkage!r}")


def sorted_spectrum(blocks: list[torch.Tensor]) -> torch.Tensor:
    """All eigenvalues of a block-diagonal matrix, descending."""
    with _eigh_threads(max(b.shape[0] for b in blocks)):
        values = [torch.linalg.eigvalsh(b) for b in blocks]
    return torch.cat(values).sort(descending=True).values


def crossing_lambda(r_train: list[torch.Tensor], r_eval: list[torch.Tensor], k: int) -> float:
    s_train, s_eval = sorted_spectrum(r_train), sorted_spectrum(r_eval)
    if not 0 <= k < len(s_train):
        raise ValueError(f"preconditioner: component k={k} outside the spectrum of size {len(s_train)}")
    a, b = float(s_train[k]), float(s_eval[k])
    if a + b <= 0:
        raise ValueError(f"preconditioner: both spectra are zero at component k={k}")
    return a / (a + b)


class Preconditioner:
    """R as per-span eigendecompositions; apply(x, power) = x R^power (R is symmetric)."""

    def __init__(self, spans, eigvals, eigvecs, *, lam=0.0, k=0, damping=DEFAULT_DAMPING,
                 n_train=0, n_eval=0, kind="block", row_norms=None, table_version=None, shrinkage=None):
        self.spans = [tuple(s) for s in spans]
        self.eigvals, self.eigvecs = list(eigvals), list(eigvecs)
        self.dim = sum(size for _, size in self.spans)
        self.params = {"lambda": float(lam), "k": int(k), "damping": float(damping),
                       "n_train": int(n_train), "n_eval": int(n_eval), "kind": kind}
        if table_version is not None:
            self.params["table_version"] = int(table_version)
        if shrinkage is not None:  # {'shrinkage': rule, 'rho_train': [...], 'rho_eval': [...]}
            self.params.update(shrinkage)
        self.row_norms: dict[float, torch.Tensor] = dict(row_norms or {})  # power -> [n_rows] float32
        self._powers: dict[float, list[torch.Tensor]] = {}
        self._placed: dict[tuple, list[torch.Tensor]] = {}  # (power, device, dtype) -> blocks

    @classmethod
    def from_matrices(cls, spans, matrices: list[torch.Tensor], **params) -> "Preconditioner":
        with _eigh_threads(max(m.shape[0] for m in matrices)):
            pairs = [torch.linalg.eigh(m.double()) for m in matrices]
        return cls(spans, [p.eigenvalues for p in pairs], [p.eigenvectors for p in pairs], **params)

    def matrices(self) -> list[torch.Tensor]:
        """R per span, [size, size] float64."""
        return [(u * s) @ u.T for s, u in zip(self.eigvals, self.eigvecs)]

    def power(self, power: float) -> list[torch.Tensor]:
        """R^power per span, damped, float64."""
        if power not in self._powers:
            mean = float(torch.cat(self.eigvals).sum()) / self.dim
            shift = self.params["damping"] * mean
            self._powers[power] = [(u * (s.clamp(min=0) + shift) ** power) @ u.T
                                   for s, u in zip(self.eigvals, self.eigvecs)]
        return self._powers[power]

    def apply(self, x: torch.Tensor, power: float) -> torch.Tensor:
        """x [batch, d] -> x R^power [batch, d], computed in x's dtype on x's device
        (-0.5 whitens, -1.0 for TRAK). The power is formed once in float64, then cached per
        (device, dtype), so scanning a table does not re-copy it for every batch."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"preconditioner: vectors have width {x.shape[-1]}, R has {self.dim}")
        key = (power, x.device, x.dtype)
        if key not in self._placed:
            self._placed[key] = [m.to(device=x.device, dtype=x.dtype) for m in self.power(power)]
        out = torch.empty_like(x)
        for (offset, size), m in zip(self.spans, self._placed[key]):
            out[:, offset: offset + size] = x[:, offset: offset + size] @ m
        return out

    def norms(self, x: torch.Tensor, power: float) -> torch.Tensor:
        """|x R^power| per row: x [batch, d] -> [batch] float32 (the whitened norms of stored rows;
        power 0: the plain norms, without a product by the identity)."""
        if power == 0:
            return torch.linalg.vector_norm(x.float(), dim=1)
        return torch.linalg.vector_norm(self.apply(x.float(), power), dim=1)

    def to_bytes(self) -> bytes:
        """The file's bytes in the canonical layout (content.py): the same R gives the same
        bytes in every process, so its sha256 names it by its content."""
        arrays = {}
        for i, (s, u) in enumerate(zip(self.eigvals, self.eigvecs)):
            arrays[f"eigvals.{i}"], arrays[f"eigvecs.{i}"] = s.cpu().numpy(), u.cpu().numpy()
        for power, norms in self.row_norms.items():
            arrays[f"row_norms.{power!r}"] = norms.float().cpu().numpy()
        meta = {key: json.dumps(value) if isinstance(value, list) else str(value) for key, value in self.params.items()}
        meta["spans"] = json.dumps(self.spans)
        return canonical_safetensors(arrays, meta)

    def save(self, path: str | Path) -> Path:
        return write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "Preconditioner":
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            try:
                spans = json.loads(meta["spans"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                return cls(spans, [tensors[f"eigvals.{i}"] for i in range(len(spans))],
                           [tensors[f"eigvecs.{i}"] for i in range(len(spans))],
                           lam=float(meta["lambda"]), k=int(meta["k"]), damping=float(meta["damping"]),
                           n_train=int(meta["n_train"]), n_eval=int(meta["n_eval"]), kind=meta["kind"],
                           row_norms={float(key.split(".", 1)[1]): value for key, value in tensors.items()
                                      if key.startswith("row_norms.")},
                           table_version=int(meta["table_version"]) if "table_version" in meta else None,
                           shrinkage={key: json.loads(meta[key]) if key.startswith("rho") else meta[key]
                                      for key in ("shrinkage", "rho_train", "rho_eval") if key in meta} or None)
            except KeyError as exc:
                raise ValueError(f"{path}: preconditioner file lacks {exc.args[0]!r}") from None


def fit_preconditioner(train: Iterable[torch.Tensor], queries: Iterable[torch.Tensor] | None = None, *,
                       dim: int, spans: list[tuple[int, int]] | None = None, kind: str = "block",
                       damping: float = DEFAULT_DAMPING, k: int | None = None,
                       shrinkage=DEFAULT_SHRINKAGE) -> Preconditioner:
    """Fit R (mixed when `queries` is given) from streams of [batch, dim] vectors, each estimate
    shrunk by `shrinkage` ('prior', 'ledoit-wolf', 'none' or a fixed rho; module docstring) before the mix.

    kind="block" uses `spans` (Layout.spans()); kind="dense" one span [0, dim). `train` may also
    be a GramAccumulator already summed over those spans (the Ray engine's partial sums)."""
    if kind not in KINDS:
        raise ValueError(f"preconditioner kind must be one of {KINDS}, not {kind!r}")
    check_shrinkage(shrinkage)
    spans = [(0, dim)] if kind == "dense" or spans is None else [tuple(s) for s in spans]
    ends = [0] + [offset + size for offset, size in spans]
    if [offset for offset, _ in spans] != ends[:-1] or ends[-1] != dim:
        raise ValueError(f"preconditioner: spans {spans} do not tile [0, {dim})")
    k = max(1, dim // 64) if k is None else k
    r_train = train if isinstance(train, GramAccumulator) else GramAccumulator(spans)
    if r_train is not train:
        for x in train:
            r_train.update(x)
    elif r_train.spans != spans:  # summed elsewhere (distributed/fit.py): over the same blocks
        raise ValueError(f"preconditioner: sums over spans {r_train.spans}, expected {spans}")
    matrices, lam, n_eval = r_train.means(), 0.0, 0
    shrunk, rho_train = shrink(matrices, r_train, shrinkage)
    rule = {"shrinkage": str(shrinkage), "rho_train": rho_train}
    if queries is not None:
        r_eval = GramAccumulator(spans)
        for x in queries:
            r_eval.update(x)
        lam, n_eval = crossing_lambda(matrices, r_eval.means(), k), r_eval.n  # from the sample spectra
        evals, rule["rho_eval"] = shrink(r_eval.means(), r_eval, shrinkage)
        shrunk = [lam * e + (1 - lam) * t for t, e in zip(shrunk, evals)]
    return Preconditioner.from_matrices(spans, shrunk, lam=lam, k=k, damping=damping,
                                        n_train=r_train.n, n_eval=n_eval, kind=kind, shrinkage=rule)
