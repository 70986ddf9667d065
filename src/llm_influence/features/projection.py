"""Seeded random projections of per-example gradients (``--project-dim D``).

For models whose LoRA gradients are too large to store, each example's gradient is
projected during extraction, batch by batch, so full gradients are never written:

* the total dimension ``D`` is split over the LoRA blocks in proportion to their sizes
  (:func:`allocate`: block ``l`` with ``d_l = rows * cols`` parameters gets
  ``k_l ~ D d_l / sum_m d_m`` dimensions, at least 1, at most ``d_l``, summing to ``D``
  exactly; with ``D`` equal to the parameter count every block keeps its size);
* block ``l``'s flattened gradient ``g_l`` (``[d_l]``) becomes ``P_l g_l`` (``[k_l]``), stored
  as a ``[n, 1, k_l]`` block under the same name, so block-wise methods keep their blocks
  and ``projected`` concatenates them (``sum_l k_l = D``).

``P_l`` (``[k_l, d_l]``) is generated from ``seed`` and the block name alone (a CPU
``torch.Generator`` seeded with a SHA-256 of both), so it is the same on every rank and in
every run, whatever the device. Kinds (``E[P_l^T P_l] = I`` for all three, so
``E <P g, P h> = <g, h>``):

* ``gaussian`` (default): i.i.d. ``N(0, 1/k_l)`` entries (Johnson-Lindenstrauss: for
  fixed ``g, h`` the error of ``<P_l g_l, P_l h_l>`` has standard deviation
  ``<= sqrt(2/k_l) ||g_l|| ||h_l||``);
* ``rademacher``: i.i.d. ``+-1/sqrt(k_l)`` entries (same guarantee, cheaper to store);
* ``orthogonal``: ``sqrt(d_l/k_l)`` times ``k_l`` orthonormal rows (from the QR
  decomposition of a Gaussian matrix); with ``k_l = d_l`` it is an exact rotation, which
  changes no inner product (the tests use this to check ``projected`` against ``exact-full``).

The projection is applied in the gradients' dtype on their device (``P_l`` is generated
in float64 on the CPU and cast). Memory: ``sum_l k_l d_l`` numbers for the matrices (about
``D`` times the mean block size), generated once per extraction and cached.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from ..errors import UserError

PROJECTION_KINDS = ("gaussian", "rademacher", "orthogonal")


@dataclass(frozen=True)
class ProjectionSpec:
    """``dim``: total projected dimension ``D``; ``seed``; ``kind`` (see the module docstring)."""

    dim: int
    seed: int = 0
    kind: str = "gaussian"

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise UserError(f"--project-dim must be a positive integer, got {self.dim!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"--project-seed must be an integer, got {self.seed!r}")
        if self.kind not in PROJECTION_KINDS:
            raise UserError(f"--project-kind must be one of {', '.join(PROJECTION_KINDS)}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def allocate(dim: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """``{block: k_l}``: ``dim`` split over blocks in proportion to ``sizes`` (largest
    remainder, ties to the earlier block), each ``1 <= k_l <= d_l``, summing to ``dim``."""
    blocks = list(sizes)
    total = sum(sizes.values())
    if dim < len(blocks):
        raise UserError(f"--project-dim {dim} is smaller than the number of LoRA blocks ({len(blocks)}); "
                        "each block needs at least one dimension")
    if dim > total:
        raise UserError(f"--project-dim {dim} exceeds the number of LoRA parameters ({total}); "
                        "drop --project-dim to keep the full gradients")
    # exact integer arithmetic: block b's quota is dim * d_b / total; "deficit" compares
    # quota - k_b across blocks through its numerator dim * d_b - k_b * total
    k = {b: max(1, dim * sizes[b] // total) for b in blocks}

    def deficit(b: str) -> int:
        return dim * sizes[b] - k[b] * total

    while sum(k.values()) < dim:
        b = max((b for b in blocks if k[b] < sizes[b]), key=lambda b: (deficit(b), -blocks.index(b)))
        k[b] += 1
    while sum(k.values()) > dim:  # only when the minimum of 1 pushed the sum over
        b = min((b for b in blocks if k[b] > 1), key=lambda b: (deficit(b), -blocks.index(b)))
        k[b] -= 1
    return k


def block_seed(seed: int, block: str) -> int:
    """A 63-bit generator seed from the projection seed and the block name."""
    digest = hashlib.sha256(f"llm-influence-projection/{seed}/{block}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_matrix(kind: str, k: int, d: int, seed: int) -> torch.Tensor:
    """``[k, d]`` float64 matrix of ``kind`` from a CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(k)
    if kind == "rademacher":
        signs = torch.randint(0, 2, (k, d), generator=gen, dtype=torch.int64).to(torch.float64)
        return (2.0 * signs - 1.0) / math.sqrt(k)
    if kind == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))[None, :]
        return q.T.contiguous() * math.sqrt(d / k)
    raise UserError(f"unknown projection kind {kind!r}; choose one of {', '.join(PROJECTION_KINDS)}")


class GradientProjector:
    """Projects ``{block: [B, rows, cols]}`` gradients to ``[B, 1, k_l]`` (see the module
    docstring). ``shapes``: ``{block: (rows, cols)}`` of every LoRA block, in order."""

    def __init__(self, spec: ProjectionSpec, shapes: Mapping[str, tuple[int, int]]) -> None:
        self.spec = spec
        self.shapes = {b: tuple(s) for b, s in shapes.items()}
        self.dims = allocate(spec.dim, {b: math.prod(s) for b, s in self.shapes.items()})
        self._cache: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def matrix(self, block: str, dtype: torch.dtype = torch.float64,
               device: str | torch.device = "cpu") -> torch.Tensor:
        """``P_l`` ``[k_l, d_l]`` in ``dtype`` on ``device`` (cached)."""
        key = (block, dtype, str(device))
        if key not in self._cache:
            rows, cols = self.shapes[block]
            p = projection_matrix(self.spec.kind, self.dims[block], rows * cols,
                                  block_seed(self.spec.seed, block))
            self._cache[key] = p.to(dtype=dtype, device=device)
        return self._cache[key]

    def output_shape(self, block: str, shape: tuple[int, ...]) -> tuple[int, int]:
        if tuple(shape) != self.shapes[block]:
            raise ValueError(f"{block}: gradient shaped {tuple(shape)}, the projection expects {self.shapes[block]}")
        return (1, self.dims[block])

    def __call__(self, block: str, grads: torch.Tensor) -> torch.Tensor:
        """``[B, rows, cols]`` -> ``[B, 1, k_l]`` in the gradients' dtype and device."""
        b = grads.shape[0]
        p = self.matrix(block, grads.dtype, grads.device)
        return (grads.reshape(b, -1) @ p.T).reshape(b, 1, p.shape[0])

    def describe(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "blocks": len(self.dims),
                "parameters": sum(math.prod(s) for s in self.shapes.values())}
