"""The MNIST test split (10,000 images) from the data directory, for convex-model studies.

Files: ``DIR/mnist/t10k-images-idx3-ubyte.gz`` and ``DIR/mnist/t10k-labels-idx1-ubyte.gz``
(IDX format, gzip), where ``DIR`` is the data directory (``--data-dir`` or
``$LLM_INFLUENCE_DATA``, see :func:`.tasks.resolve_data_dir`).

IDX: a big-endian header, magic ``0x00000803`` (2051: unsigned bytes, 3 dimensions) then
count, rows, cols for images, magic ``0x00000801`` (2049: unsigned bytes, 1 dimension) then
count for labels, followed by the raw bytes. Any mismatch is a :class:`UserError` naming
the file.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError
from .tasks import resolve_data_dir

IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
N_CLASSES = 10
SIDE = 28


def _read_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: MNIST file not found (expected in <data dir>/mnist/)")
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable gzip file ({exc})") from None


def read_idx_images(path: str | Path) -> np.ndarray:
    """``[N, rows, cols]`` uint8 images of a gzip IDX3 file."""
    path = Path(path)
    raw = _read_gzip(path)
    if len(raw) < 16:
        raise UserError(f"{path}: IDX image header is truncated ({len(raw)} bytes)")
    magic, count, rows, cols = struct.unpack(">iiii", raw[:16])
    if magic != IMAGES_MAGIC:
        raise UserError(f"{path}: magic number {magic} is not an IDX image file's {IMAGES_MAGIC}")
    if len(raw) != 16 + count * rows * cols:
        raise UserError(f"{path}: header says {count} images of {rows}x{cols} "
                        f"({16 + count * rows * cols} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """``[N]`` uint8 labels of a gzip IDX1 file."""
    path = Path(path)
    raw = _read_gzip(path)
    if len(raw) < 8:
        raise UserError(f"{path}: IDX label header is truncated ({len(raw)} bytes)")
    magic, count = struct.unpack(">ii", raw[:8])
    if magic != LABELS_MAGIC:
        raise UserError(f"{path}: magic number {magic} is not an IDX label file's {LABELS_MAGIC}")
    if len(raw) != 8 + count:
        raise UserError(f"{path}: header says {count} labels but the file has {len(raw) - 8} label bytes")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if labels.size and int(labels.max()) >= N_CLASSES:
        raise UserError(f"{path}: label {int(labels.max())} is outside 0..{N_CLASSES - 1}")
    return labels


def load_mnist(data_dir: str | Path | None = None, *, pool: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test split: ``(images [N, (28/pool)^2] float32 in [0, 1], labels [N] int64)``.

    ``pool`` > 1 average-pools ``pool x pool`` pixel squares (it must divide 28), giving
    smaller inputs for exact-Hessian studies (``pool=4``: 7x7 = 49 features).
    """
    if pool not in (1, 2, 4, 7, 14, 28):
        raise UserError(f"MNIST pool must divide {SIDE} (1, 2, 4, 7, 14 or 28), got {pool!r}")
    root = resolve_data_dir(data_dir) / "mnist"
    images = read_idx_images(root / IMAGES_FILE)
    labels = read_idx_labels(root / LABELS_FILE)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[1:] != (SIDE, SIDE):
        raise UserError(f"{root / IMAGES_FILE}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    if pool > 1:
        side = SIDE // pool
        x = x.reshape(-1, side, pool, side, pool).mean(dim=(2, 4))
    return x.reshape(x.shape[0], -1).contiguous(), torch.from_numpy(labels.astype(np.int64))


def mnist_split(images: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int],
                seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random subsets of the given sizes, deterministic in ``seed``.

    One seeded permutation of all rows is cut into consecutive pieces, so the subsets never
    overlap and the same ``seed`` always gives the same rows (in permutation order).
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > images.shape[0]:
        raise UserError(f"MNIST subset sizes {sizes} do not fit in {images.shape[0]} rows")
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for s in sizes:
        idx = perm[start:start + s]
        out.append((images[idx], labels[idx]))
        start += s
    return out
