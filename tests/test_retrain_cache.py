"""The retrain cache: a hit returns exactly what the retrain returned, without retraining,
and the key changes with the mask, the seed and the retrainer's identity."""

from __future__ import annotations

import numpy as np

from llm_influence.training.retrain_cache import CachedRetrainer


class CountingRetrainer:
    """Losses that depend on the mask and seed in a way a wrong cache hit would show."""

    def __init__(self, n_train: int = 7, n_test: int = 3, seed: int = 5, tag: str = "a") -> None:
        self.n_train, self.n_test, self.seed, self.tag = n_train, n_test, seed, tag
        self.calls: list[tuple[tuple[int, ...], int]] = []
        self.retrain_seconds: list[float] = []

    def identity(self) -> dict:
        return {"tag": self.tag}

    def retrain(self, mask, seed=None):
        seed = self.seed if seed is None else seed
        rows = tuple(np.flatnonzero(mask).tolist())
        self.calls.append((rows, seed))
        self.retrain_seconds.append(1.5 + len(self.calls))
        rng = np.random.default_rng([seed, *rows])
        return rng.standard_normal(self.n_test) / 3.0  # not exactly representable in few digits


def test_hits_return_the_stored_losses_bitwise_and_keep_the_measured_seconds(tmp_path):
    inner = CountingRetrainer()
    cache = CachedRetrainer(inner, tmp_path / "c")
    masks = np.array([[1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 0]], dtype=bool)
    first = [cache.retrain(m) for m in masks] + [cache.retrain(masks[0], 9)]
    assert len(inner.calls) == 3 and cache.hits == 0 and len(list((tmp_path / "c").glob("*.json"))) == 3

    again = CachedRetrainer(CountingRetrainer(), tmp_path / "c")  # a new process: same identity
    second = [again.retrain(m) for m in masks] + [again.retrain(masks[0], 9)]
    assert again.retrainer.calls == [] and again.hits == 3
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
    assert again.retrain_seconds == cache.retrain_seconds == [2.5, 3.5, 4.5]
    assert again.retrain(masks[0], None).tobytes() == again.retrain(masks[0], 5).tobytes()  # None = own seed


def test_the_key_covers_mask_seed_and_identity(tmp_path):
    cache = CachedRetrainer(CountingRetrainer(), tmp_path)
    mask = np.array([1, 0, 1, 1, 0, 0, 1], dtype=bool)
    other = mask.copy()
    other[1] = True
    keys = {cache.key(mask), cache.key(other), cache.key(mask, 6),
            CachedRetrainer(CountingRetrainer(tag="b"), tmp_path).key(mask)}
    assert len(keys) == 4
    assert cache.key(mask) == cache.key(mask.astype(int)) == cache.key(mask, 5)


def test_a_damaged_file_is_retrained_and_replaced(tmp_path):
    inner = CountingRetrainer()
    cache = CachedRetrainer(inner, tmp_path)
    mask = np.ones(7, dtype=bool)
    losses = cache.retrain(mask)
    (tmp_path / f"{cache.key(mask)}.json").write_text("{not json")
    assert cache.retrain(mask).tobytes() == losses.tobytes() and len(inner.calls) == 2
    assert CachedRetrainer(CountingRetrainer(), tmp_path).retrain(mask).tobytes() == losses.tobytes()
