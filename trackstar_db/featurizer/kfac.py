"""Kronecker-factored curvature of the tracked matrices (K-FAC and EK-FAC), in pure torch.

For a tracked matrix W [rows, cols] the per-example gradient is G = X_r^T X_c (tracked.py; its
orientation per kind: Linear X_r = output-grads, X_c = inputs; Conv1D the other way round;
Embedding X_r = one-hot ids). Over the training tokens t (attention mask 1) of every use:

    C_r = (1/N) sum_t x_r,t x_r,t^T  [rows, rows]     C_c = (1/N) sum_t x_c,t x_c,t^T  [cols, cols]
    C_r = Q_r diag(s_r) Q_r^T,  C_c = Q_c diag(s_c) Q_c^T     (float64 eigendecompositions)

K-FAC approximates the Fisher of W (row-major vec of G) by C_r (x) C_c, whose eigenvalues are
Lambda[j, k] = s_r[j] s_c[k] in the eigenbasis Q_r (x) Q_c. EK-FAC keeps that basis and replaces
the eigenvalues by the mean over training examples of the squared rotated gradient,
Lambda[j, k] = mean_i ((Q_r^T G_i Q_c)[j, k])^2 (George et al. 2018). The influence of z on q is

    score(q, z) = sum_W sum_jk (Q_r^T G_q Q_c)_jk (Q_r^T G_z Q_c)_jk / (Lambda_jk + lambda_W)

with per-matrix damping lambda_W = damping * mean(Lambda_W) (default damping 0.1: kronfluence's
heuristic). Matrices are independent blocks (a block-diagonal Fisher over the tracked matrices).
The gradients (of the factors' fit and of every score) are those of each example's summed token
loss (TOKEN_LOSS), so an example counts by its tokens as it does in the training loss; the
manifest records it (factors fitted before it was recorded used the mean and are scored alike).

A side that only ever sees token ids (an untied embedding's rows) has a diagonal covariance (the
ids' counts) and the identity as its basis; a side wider than `max_dense` (default
MAX_DENSE_SIDE) is kept diagonal too (its second moments only): a dense [n, n] factor of a
50,000-token vocabulary would be 20 GB. A tied weight (GPT-2's wte and lm_head) is one matrix: its
uses add to the same sums, and its rotated gradients are summed over the uses before squaring.

Rotating never forms G from the factors twice: Q_r^T G Q_c = (X_r Q_r)^T (X_c Q_c); ids pick rows
of Q_r. A rotated gradient is [rows, cols] floats per example, as large as the matrix: the second
stage (retrieval/rerank.py) rotates a few hundred candidates per batch, never a corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from trackstar_db.content import canonical_safetensors, write_bytes

from .tracked import TrackedMatrix, dense_gradient, per_example_backward

KINDS = ("kfac", "ekfac")
MAX_DENSE_SIDE = 4096  # a side wider than this keeps a diagonal covariance (see the module docstring)
TOKEN_LOSS = "sum"  # factors and scores take each example's summed token loss, as training weighs its tokens
DEFAULT_DAMPING = 0.1  # lambda_W = DEFAULT_DAMPING * mean eigenvalue of W


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"curvature kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind


def _token_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """[batch * tokens] bool of the tokens that count, when the mask fits x's [batch, tokens]."""
    if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
        return None
    return mask.reshape(-1).to(device=x.device, dtype=torch.bool)


class CovarianceAccumulator:
    """Streaming sums of x x^T per side of every tracked matrix, float64 (diagonal sides: sums of
    x^2, or of id counts). update(name, x_r, x_c, mask) per use; `covariances()` the means."""

    def __init__(self, tracked: list[TrackedMatrix], max_dense: int = MAX_DENSE_SIDE):
        self.shapes = {m.name: (m.rows, m.cols) for m in tracked}
        ids_only = {m.name: all(kind == "embedding" for _, kind in m.uses) for m in tracked}
        self.diagonal = {m.name: (ids_only[m.name] or m.rows > max_dense, m.cols > max_dense) for m in tracked}
        self.sums: dict[str, list[torch.Tensor]] = {}
        for m in tracked:
            self.sums[m.name] = [torch.zeros(n if diag else (n, n), dtype=torch.float64)
                                 for n, diag in zip((m.rows, m.cols), self.diagonal[m.name])]
        self.tokens = {m.name: 0 for m in tracked}

    def _add(self, acc: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None, n: int, diagonal: bool) -> None:
        if x.dtype == torch.long:  # ids: one-hot rows, a diagonal of counts
            ids = x.reshape(-1)
            ids = ids[keep] if keep is not None else ids
            acc += torch.bincount(ids.cpu(), minlength=n)[:n].double()
            return
        flat = x.reshape(-1, x.shape[-1])
        flat = (flat[keep] if keep is not None else flat).double()
        acc += ((flat * flat).sum(0) if diagonal else flat.T @ flat).cpu()

    def update(self, name: str, x_r: torch.Tensor, x_c: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        keep = _token_mask(mask, x_c)
        rows, cols = self.shapes[name]
        diag_r, diag_c = self.diagonal[name]
        if x_r.dtype == torch.long and not diag_r:  # a tied side: ids add one-hot outer products (diagonal)
            ids = x_r.reshape(-1)
            ids = ids[keep] if keep is not None else ids
            self.sums[name][0].diagonal().add_(torch.bincount(ids.cpu(), minlength=rows)[:rows].double())
        else:
            self._add(self.sums[name][0], x_r, keep, rows, diag_r)
        self._add(self.sums[name][1], x_c, keep, cols, diag_c)
        self.tokens[name] += int(keep.sum()) if keep is not None else x_c.shape[0] * x_c.shape[1]

    def covariances(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (C_r, C_c)}: [n, n] dense or [n] diagonal, float64."""
        out = {}
        for name, (row, col) in self.sums.items():
            if self.tokens[name] == 0:
                raise ValueError(f"curvature: no token reached {name!r}")
            out[name] = (row / self.tokens[name], col / self.tokens[name])
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that resume the sums (with `load_state`)."""
        out = {f"{name}/tokens": torch.tensor(self.tokens[name], dtype=torch.int64) for name in self.sums}
        for name, (row, col) in self.sums.items():
            out[f"{name}/row"], out[f"{name}/col"] = row, col
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.sums:
            self.sums[name] = [tensors[f"{name}/row"].double(), tensors[f"{name}/col"].double()]
            self.tokens[name] = int(tensors[f"{name}/tokens"])


@dataclass
class Side:
    """One side's eigendecomposition: eigvals [n] float64, eigvecs [n, n] (None: the identity)."""

    eigvals: torch.Tensor
    eigvecs: torch.Tensor | None = None

    @classmethod
    def of(cls, covariance: torch.Tensor) -> "Side":
        if covariance.dim() == 1:
            return cls(covariance.double().clamp(min=0))
        pair = torch.linalg.eigh(covariance.double())
        return cls(pair.eigenvalues.clamp(min=0), pair.eigenvectors)

    def matrix(self) -> torch.Tensor:
        """The covariance [n, n] float64."""
        if self.eigvecs is None:
            return torch.diag(self.eigvals)
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T


@dataclass
class KroneckerFactors:
    """The fitted curvature: per tracked matrix its two Sides and, for EK-FAC, the corrected
    eigenvalues [rows, cols]; `params` records what they were fitted on (kind, damping, n, ...)."""

    sides: dict[str, tuple[Side, Side]]
    corrected: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        self._placed: dict[tuple, torch.Tensor] = {}

    @property
    def kind(self) -> str:
        return "ekfac" if self.corrected else "kfac"

    @property
    def damping(self) -> float:
        return float(self.params.get("damping", DEFAULT_DAMPING))

    @property
    def summed(self) -> bool:
        """Were the factors fitted on each example's summed token loss (TOKEN_LOSS, the weighting
        the training loss gives a token), or on its mean (factors fitted before the choice was
        recorded)? Their scores take gradients of the same loss."""
        return self.params.get("token_loss") == "sum"

    def eigenvalues(self, name: str, kind: str | None = None) -> torch.Tensor:
        """Lambda [rows, cols] float64 of `kind` (default: the fitted kind; 'kfac' always available)."""
        kind = check_kind(kind or self.kind)
        if kind == "ekfac":
            if name not in self.corrected:
                raise ValueError("curvature: these factors hold no EK-FAC eigenvalue correction; fit with kind 'ekfac'")
            return self.corrected[name].double()
        row, col = self.sides[name]
        return torch.outer(row.eigvals, col.eigvals)

    def inverse(self, name: str, kind: str | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """1 / (Lambda + lambda_W) [rows, cols] float32 on `device` (cached)."""
        key = (name, kind or self.kind, str(device))
        if key not in self._placed:
            values = self.eigenvalues(name, kind)
            self._placed[key] = (1.0 / (values + self.damping * float(values.mean()))).float().to(device)
        return self._placed[key]

    def basis(self, name: str, side: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Q of one side (0 row, 1 col) float32 on `device`, None for the identity (cached)."""
        key = (name, side, str(device), "basis")
        if key not in self._placed:
            q = self.sides[name][side].eigvecs
            self._placed[key] = None if q is None else q.float().to(device)
        return self._placed[key]

    def rotate(self, name: str, x_r: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        """Q_r^T G Q_c [batch, rows, cols] float32 of one use's factors (G = X_r^T X_c)."""
        q_r, q_c = self.basis(name, 0, x_c.device), self.basis(name, 1, x_c.device)
        a = x_c.float() if q_c is None else x_c.float() @ q_c
        if x_r.dtype == torch.long and q_r is None:
            return dense_gradient(x_r, a, self.sides[name][0].eigvals.shape[0])
        r = q_r[x_r] if x_r.dtype == torch.long else (x_r.float() if q_r is None else x_r.float() @ q_r)
        return r.transpose(1, 2) @ a

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for name, (row, col) in self.sides.items():
            for label, side in (("row", row), ("col", col)):
                tensors[f"{name}/{label}.eigvals"] = side.eigvals.contiguous()
                if side.eigvecs is not None:
                    tensors[f"{name}/{label}.eigvecs"] = side.eigvecs.contiguous()
        for name, values in self.corrected.items():
            tensors[f"{name}/ekfac"] = values.contiguous()
        meta = {"params": json.dumps(self.params, sort_keys=True), "names": json.dumps(list(self.sides))}
        # one byte layout for one content (content.py): the file is named by its sha256
        return write_bytes(path, canonical_safetensors({k: v.cpu().numpy() for k, v in tensors.items()}, meta))

    @classmethod
    def load(cls, path: str | Path) -> "KroneckerFactors":
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            try:
                names = json.loads(meta["names"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            except KeyError as exc:
                raise ValueError(f"{path}: curvature file lacks {exc.args[0]!r}") from None
        sides = {n: tuple(Side(tensors[f"{n}/{s}.eigvals"], tensors.get(f"{n}/{s}.eigvecs")) for s in ("row", "col"))
                 for n in names}
        corrected = {n: tensors[f"{n}/ekfac"] for n in names if f"{n}/ekfac" in tensors}
        return cls(sides, corrected, json.loads(meta.get("params", "{}")))


def factors_from(covariances: dict[str, tuple[torch.Tensor, torch.Tensor]], params: dict | None = None) -> KroneckerFactors:
    """K-FAC factors (eigendecompositions) of accumulated covariances."""
    return KroneckerFactors({name: (Side.of(c_r), Side.of(c_c)) for name, (c_r, c_c) in covariances.items()},
                            params=dict(params or {}))


def rotated_batch(model: torch.nn.Module, tracked: list[TrackedMatrix], factors: KroneckerFactors,
                  batch: dict[str, torch.Tensor], covariance: CovarianceAccumulator | None = None,
                  relabel=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: Q_r^T G_i Q_c [batch, rows, cols]} summed over uses, loss [batch]) of one
    collated batch; `covariance`, when given, takes the same factors too; `relabel`: the labels
    the loss takes (tracked.per_example_backward)."""
    out: dict[str, torch.Tensor] = {}
    mask = batch["attention_mask"]

    def on_factors(name: str, x_r: torch.Tensor, x_c: torch.Tensor) -> None:
        part = factors.rotate(name, x_r, x_c)
        out[name] = out[name] + part if name in out else part
        if covariance is not None:
            covariance.update(name, x_r, x_c, mask)

    loss, _ = per_example_backward(model, tracked, batch, on_factors, summed=factors.summed,
                                   relabel=relabel)
    return out, loss


class EigenCorrection:
    """Streaming mean over examples of (Q_r^T G_i Q_c)^2 per tracked matrix, float64."""

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        self.n = 0

    def update(self, rotated: dict[str, torch.Tensor]) -> None:
        size = None
        for name, values in rotated.items():
            self.sums[name] += values.double().square().sum(0).cpu()
            size = values.shape[0]
        self.n += size or 0

    def means(self) -> dict[str, torch.Tensor]:
        if self.n == 0:
            raise ValueError("curvature: no example reached the eigenvalue correction")
        return {name: (s / self.n) for name, s in self.sums.items()}

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"{n}/ekfac": s for n, s in self.sums.items()}, "ekfac_n": torch.tensor(self.n)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sums = {n: tensors[f"{n}/ekfac"].double() for n in self.sums}
        self.n = int(tensors["ekfac_n"])


def precondition(factors: KroneckerFactors, rotated: dict[str, torch.Tensor], kind: str | None = None
                 ) -> dict[str, torch.Tensor]:
    """(Lambda + lambda)^-1 applied to rotated gradients (the query side of a score)."""
    return {name: values * factors.inverse(name, kind, values.device) for name, values in rotated.items()}


def unrotate(factors: KroneckerFactors, preconditioned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """H_q = Q_r M Q_c^T [nq, rows, cols] of preconditioned rotated gradients M: the query's
    (F + lambda)^-1 g_q in the weight's own layout, so <H_q, G_z> is the score of z."""
    out = {}
    for name, m in preconditioned.items():
        q_r, q_c = factors.basis(name, 0, m.device), factors.basis(name, 1, m.device)
        h = m if q_r is None else q_r @ m
        out[name] = h if q_c is None else h @ q_c.T
    return out


def factor_scores(h: torch.Tensor, x_r: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
    """[nq, batch] <H_q, G_b> of one use's factors, without forming G_b = X_r^T X_c:
    sum over tokens of x_r,t^T H_q x_c,t. h [nq, rows, cols] float32; ids pick rows of H_q.
    Cost nq x batch x tokens x rows x cols, against rows^2 + cols^2 per token for a rotation:
    the cheaper path for a few queries (retrieval/rerank.py chooses)."""
    if x_r.dtype == torch.long:
        side = h[:, x_r]  # [nq, batch, tokens, cols]
    else:
        side = torch.einsum("btr,qrc->qbtc", x_r.float(), h)
    return (side * x_c.float()[None]).sum((2, 3))


def direct_scores(model: torch.nn.Module, tracked: list[TrackedMatrix], h: dict[str, torch.Tensor],
                  batch: dict[str, torch.Tensor], summed: bool = False) -> torch.Tensor:
    """[nq, batch] float64 sum over tracked matrices and uses of <H_q, G_b> (see factor_scores)."""
    total: list[torch.Tensor] = []

    def on_factors(name: str, x_r: torch.Tensor, x_c: torch.Tensor) -> None:
        part = factor_scores(h[name], x_r, x_c).double()
        if total:
            total[0] = total[0] + part
        else:
            total.append(part)

    per_example_backward(model, tracked, batch, on_factors, summed=summed)
    return total[0]


def pair_scores(preconditioned: dict[str, torch.Tensor], rotated: dict[str, torch.Tensor]) -> torch.Tensor:
    """[nq, nb] = sum over matrices of <preconditioned query_q, rotated example_b> (float32
    products, their sum over matrices float64)."""
    total = None
    for name, q in preconditioned.items():
        part = (q.flatten(1) @ rotated[name].flatten(1).T).double()
        total = part if total is None else total + part
    return total


def projected_blocks(factors: KroneckerFactors, layout, projection, kind: str | None = None
                     ) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """The curvature in the projected space of a gradient table: for every span of `layout`
    (config.Layout) the matrix F_p = (P_r (x) P_c) F (P_r (x) P_c)^T [size, size] float64, each
    block damped by damping * its mean eigenvalue (trace / size) (summed over the matrices that
    share a span, combine='sum'). `projection(name, side, k, n)` gives P [k, n] (projection.py).

    K-FAC: F_p = (P_r C_r P_r^T) (x) (P_c C_c P_c^T). EK-FAC: F_p = M diag(Lambda) M^T with
    M = (P_r Q_r) (x) (P_c Q_c), formed as sum_j (a_j a_j^T) (x) (B diag(Lambda[j]) B^T),
    A = P_r Q_r [k_r, rows], B = P_c Q_c [k_c, cols]: rows x cols x k_c^2 multiply-adds."""
    kind = check_kind(kind or factors.kind)
    spans: dict[tuple[int, int], torch.Tensor] = {}
    for block in layout.blocks:
        if block.name not in factors.sides:
            raise ValueError(f"curvature: no factors for tracked matrix {block.name!r}")
        row, col = factors.sides[block.name]
        rows, cols = row.eigvals.shape[0], col.eigvals.shape[0]
        p_r = projection(block.name, "row", block.k_r, rows).double()
        p_c = projection(block.name, "col", block.k_c, cols).double()
        a = p_r if row.eigvecs is None else p_r @ row.eigvecs
        b = p_c if col.eigvecs is None else p_c @ col.eigvecs
        if kind == "kfac":
            matrix = torch.kron((a * row.eigvals) @ a.T, (b * col.eigvals) @ b.T)
        else:
            values = factors.eigenvalues(block.name, "ekfac")
            t = torch.einsum("bk,jk,ck->jbc", b, values, b)  # [rows, k_c, k_c]
            matrix = torch.einsum("aj,ej,jbc->abec", a, a, t).reshape(block.size, block.size)
        key = (block.offset, block.size)
        spans[key] = spans[key] + matrix if key in spans else matrix
    out = []
    for (offset, size), matrix in spans.items():
        out.append(matrix + factors.damping * float(matrix.diagonal().mean()) * torch.eye(size, dtype=torch.float64))
    return list(spans), out
