"""A disk cache of retrains, so an interrupted counterfactual study resumes where it stopped.

A retrain of the LLM harness costs minutes; the counterfactual study runs dozens of them and
the full reproduction runs for hours. :class:`CachedRetrainer` wraps any retrainer with an
``identity()`` (:class:`~llm_influence.training.retrain.LoraRetrainer` has one) and keeps
every retrain's test losses in ``folder/KEY.json``, where ``KEY`` is the SHA-256 of

* the retrainer's identity: the run's fine-tuning configuration, training and test example
  ids, the SHA-256 of its initial adapter checkpoint (weights, RNG state), its final
  checkpoint name and epochs, the digest of the harness's source files (the retraining code
  and everything it imports from this package), the torch version and thread count (a
  retrain is bitwise reproducible only for the same ones);
* the mask's bits and the training seed.

A hit returns the stored losses without touching the model; a miss retrains and writes the
file atomically. ``retrain_seconds`` lists, for every call, the seconds the retrain took when
it actually ran (stored with the losses), so cost figures stay the measured ones after a
resume; ``hits`` counts the calls answered from the folder. Nothing else is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..io_utils import write_json
from .retrain import check_mask

#: version of the file layout below; part of the key
CACHE_FORMAT = 1


class CachedRetrainer:
    """``retrainer`` with its retrains kept in ``folder`` (module docstring).

    Args:
        retrainer: has ``n_train``, ``n_test``, ``retrain(mask, seed)``, ``seed`` (its own
            training seed) and ``identity() -> dict`` (JSON-serialisable).
        folder: where ``KEY.json`` files live (created on the first miss).
    """

    def __init__(self, retrainer: Any, folder: str | Path) -> None:
        self.retrainer = retrainer
        self.folder = Path(folder)
        self._identity = json.dumps({"format": CACHE_FORMAT, **retrainer.identity()}, sort_keys=True)
        self.retrain_seconds: list[float] = []
        self.hits = 0

    @property
    def n_train(self) -> int:
        return self.retrainer.n_train

    @property
    def n_test(self) -> int:
        return self.retrainer.n_test

    def key(self, mask: np.ndarray, seed: Optional[int] = None) -> str:
        """Hex SHA-256 naming the file of ``retrain(mask, seed)``."""
        bits = np.packbits(check_mask(mask, self.n_train)).tobytes()
        seed = self.retrainer.seed if seed is None else int(seed)
        h = hashlib.sha256(self._identity.encode())
        h.update(b"\0mask\0" + bits + f"\0n={self.n_train}\0seed={seed}".encode())
        return h.hexdigest()

    def retrain(self, mask: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """``[n_test]`` float64 losses, from ``folder`` when this retrain was done before."""
        seed = self.retrainer.seed if seed is None else int(seed)
        path = self.folder / f"{self.key(mask, seed)}.json"
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                losses = np.asarray(record["losses"], dtype=np.float64)
                if losses.shape == (self.n_test,):
                    self.hits += 1
                    self.retrain_seconds.append(float(record["seconds"]))
                    return losses
            except (ValueError, KeyError, TypeError):
                pass  # a damaged file is recomputed and replaced
        before = len(self.retrainer.retrain_seconds)
        losses = self.retrainer.retrain(mask, seed)
        seconds = float(sum(self.retrainer.retrain_seconds[before:]))
        write_json(path, {"kept": np.flatnonzero(mask).tolist(), "seed": seed,
                          "losses": np.asarray(losses, dtype=np.float64).tolist(), "seconds": seconds})
        self.retrain_seconds.append(seconds)
        return losses
