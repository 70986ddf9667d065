"""RepT's token-level attribution: which tokens of a training example a test example draws on.

RepT (arXiv 2510.02334) scores a training example's *tokens* against a test example's
signature: for every position ``q`` of the training example whose logit is supervised (it
predicts response token ``q+1``), ``cos(s_test, [h_q ; dL/dh_q])`` at the signature's layer
(:meth:`llm_influence.methods.rept.RepT.token_scores`, :func:`~llm_influence.features.rep_grads.token_signatures`).
Higher = that token's representation and gradient point the way the test example's do.

:func:`top_tokens` is the one implementation; ``explain --tokens`` and the HTML explorer's
detail view (:func:`explorer_tokens`, cached in ``RUN/scores/CHECKPOINT/rept.tokens.json``)
call it. Token entries are ``{"position": index of the predicted token in the training
example's tokenized prompt + response, "token": its text, "score": the cosine}``, best first,
ties in position order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .data.example import Example
from .io_utils import sha256_file, write_json
from .rundir import RunDir

#: the explorer's cache file beside ``rept.safetensors``
EXPLORER_FILE = "rept.tokens.json"
#: tokens per (test, training) pair shown by the explorer
DEFAULT_EXPLORER_TOKENS = 5


def test_signatures(run: RunDir, checkpoint: str, scores_meta: Mapping[str, Any], *, batch_size: Optional[int] = None,
                    trust_remote_code: bool = False):
    """``(method, features)``: the RepT method with the arguments of a scores file's metadata
    and the run's test features at ``checkpoint`` with the signatures those scores used (the
    same layer and measurement; read from the run's feature cache when present)."""
    from .features.extract import extract_features
    from .features.measure import parse_measure
    from .methods import make_method

    method = make_method("rept", **scores_meta["arguments"])
    measure = scores_meta.get("measure") or {}
    measurement = None
    if measure.get("name") not in (None, "loss"):  # the query signatures the scores used (--measure)
        measurement = parse_measure(measure["name"] + ("" if measure.get("argument") is None
                                                       else f":{measure['argument']}"))
    recorded = run.config().get("attribute", {})
    size = batch_size or int(recorded.get("extract_batch_size") or 8)
    test = extract_features(run, checkpoint, "test", need={"repgrads"}, batch_size=size,
                            trust_remote_code=trust_remote_code, measurement=measurement, **method.feature_options())
    return method, test


def top_tokens(run: RunDir, checkpoint: str, method, test_repgrads, layer: int, train: Sequence[Example],
               wanted: Mapping[int, Sequence[int]], n_tokens: int, *, batch_size: int = 8,
               trust_remote_code: bool = False) -> dict[int, dict[int, list[dict[str, Any]]]]:
    """``{test index: {training index: top tokens}}`` for the pairs in ``wanted`` (test index
    -> training indices into ``train``), each the ``n_tokens`` best tokens of that training
    example against ``test_repgrads[test index]`` (``[n_test, 3, hidden]`` RepT signatures at
    hidden-state ``layer``), under the model fine-tuned to ``checkpoint``. One batched pass
    over the training examples that appear in ``wanted``."""
    from .features.rep_grads import token_signatures
    from .training.load import load_finetuned

    rows = sorted({int(j) for js in wanted.values() for j in js})
    if not rows or n_tokens < 1:
        return {int(i): {} for i in wanted}
    model, formatter, _ = load_finetuned(run, checkpoint, trust_remote_code=trust_remote_code)
    tokenizer = formatter.tokenizer
    sigs = dict(zip(rows, token_signatures(model, [formatter.encode(train[j]) for j in rows], tokenizer.pad_token_id,
                                           layer=layer, batch_size=batch_size)))
    out: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for i, js in wanted.items():
        out[int(i)] = {}
        for j in js:
            t = sigs[int(j)]
            scores = method.token_scores(test_repgrads[int(i)], t.hidden, t.grads).numpy()
            best = np.argsort(-scores, kind="stable")[:n_tokens]
            out[int(i)][int(j)] = [{"position": t.positions[b] + 1, "token": tokenizer.decode([t.token_ids[b]]),
                                    "score": float(scores[b])} for b in best.tolist()]
    return out


def explorer_tokens(run: RunDir, checkpoint: str, topk: Sequence[Sequence[int]],
                    n_tokens: int = DEFAULT_EXPLORER_TOKENS) -> list[list[list[dict[str, Any]]]]:
    """The explorer's token view of a run's RepT scores at ``checkpoint``: for every test
    example ``i`` and each training index in ``topk[i]`` (the page's top-k list, in its
    order) the ``n_tokens`` best tokens, as ``[test][rank] -> tokens``. Cached in
    ``RUN/scores/CHECKPOINT/rept.tokens.json``, keyed by the scores file's SHA-256, the
    top-k lists (which already reflect the ranking rule) and ``n_tokens``; recomputed (one pass of the fine-tuned model
    over the listed training examples) when the key differs."""
    from .attribute import read_scores

    scores_path = run.scores_dir(checkpoint) / "rept.safetensors"
    topk = [[int(j) for j in row] for row in topk]
    key = hashlib.sha256(json.dumps({"scores": sha256_file(scores_path), "topk": topk,
                                     "n_tokens": int(n_tokens)}).encode()).hexdigest()
    cache = scores_path.with_name(EXPLORER_FILE)
    cached = _read_cache(cache, key)
    if cached is not None:
        return cached
    _, meta = read_scores(scores_path)
    method, test = test_signatures(run, checkpoint, meta)
    train = run.load_task().train
    found = top_tokens(run, checkpoint, method, test.repgrads, test.repgrads_layer, train,
                       dict(enumerate(topk)), n_tokens)
    tokens = [[found[i][j] for j in row] for i, row in enumerate(topk)]
    write_json(cache, {"key": key, "n_tokens": int(n_tokens), "layer": test.repgrads_layer, "tokens": tokens})
    return tokens


def _read_cache(path: Path, key: str) -> Optional[list]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("tokens") if isinstance(record, dict) and record.get("key") == key else None
