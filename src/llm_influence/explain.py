"""``explain``: which training examples most influenced a model's response to a prompt.

Given a model (a base model plus a peft adapter, or a full model), its training set (JSONL:
``prompt``, ``response``, optional ``id`` and ``group``) and one or more queries (a prompt and,
optionally, the response to explain; without one the model's greedy response is generated
and explained), every chosen method scores every training example for every query and the
top ``k`` are returned, most influential first (the scores convention of
:data:`llm_influence.methods.SCORE_CONVENTION`). Ranking is the metrics' one
(:func:`~llm_influence.evaluation.metrics.rank_training`): equal scores are listed in
training-file order and share their competition rank (``1, 2, 2, 4``,
:func:`~llm_influence.evaluation.metrics.tie_ranks`), shown as ``2=`` in the tables and as
``"rank"`` / ``"tied"`` in JSON and CSV (:data:`TIE_NOTE`). With ``tokens`` (``--tokens N``)
and ``rept`` among the methods, each training example RepT lists also gets its ``N``
highest-scoring tokens (RepT's token-level attribution, :func:`attach_token_attribution`;
JSON field ``tokens`` and a table column).

Under the hood a *query run* is built in the cache (``$LLM_INFLUENCE_CACHE/explain/KEY``):
a run directory whose ``data/train.jsonl`` is the training set, whose ``data/test.jsonl``
holds the queries and whose ``checkpoints/epoch-1`` is a copy of the adapter. The ordinary
``attribute`` stage then runs on it, so the training set's features are computed once per
(model, adapter, training set, ``max_length``, ``loss_on``) and every later query costs
only the queries' own forward/backward passes plus the methods' scoring.

Without ``--adapter`` a fresh LoRA adapter (``B = 0``, ``A`` seeded) is attached to the full
model: the model's outputs do not change, the ``lora_A`` gradients are zero (those blocks
drop out), and the ``lora_B`` gradients are the full weight gradients of the target modules
projected onto ``A``'s rows, a seeded random projection (LoGra-style).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .attribute import AttributeArgs, attribute, build_methods, read_scores
from .config import TrainArgs
from .data.example import Example
from .data.jsonl import iter_json_objects, read_examples, string_field, unique_id
from .errors import UserError
from .evaluation.metrics import RANK_BY_CHOICES, rank_training, tie_ranks
from .features import store as feature_store
from .io_utils import atomic_path, publish_dir
from .models.formatting import LOSS_ON_CHOICES
from .models.lora import LoraSpec
from .progress import log
from .rundir import RunDir, write_examples

DEFAULT_EXPLAIN_METHODS = ("repsim", "datainf")
QUERY_RUN_FORMAT = 1
CHECKPOINT = "epoch-1"
_QUERY_PREFIX = "query-"
#: the tie rule, said once in every output
TIE_NOTE = ("training examples with equal scores share their competition rank (1, 2, 2, 4; marked tied, "
            "'2=' in tables) and are listed in training-file order")


@dataclass(frozen=True)
class Query:
    """One prompt to explain; ``response=None`` means "generate it greedily"."""

    id: str
    prompt: str
    response: Optional[str] = None


@dataclass
class ExplainArgs:
    """Arguments of :func:`explain`.

    ``max_length`` and ``loss_on`` must match how the model was fine-tuned for the
    gradients to be those of its training loss (``--run`` copies them from a run).
    ``lora`` and ``seed`` are used only without an adapter (a fresh LoRA, see the module
    docstring). ``cache_dir`` defaults to ``$LLM_INFLUENCE_CACHE/explain``.
    ``trust_remote_code`` lets a model loaded by path run its own code (explicit opt-in).
    ``tokens`` > 0 (needs ``rept`` among the methods) adds RepT's token-level attribution:
    the ``tokens`` highest-scoring tokens of each training example RepT lists
    (:func:`attach_token_attribution`).
    """

    model: str
    train: Path
    adapter: Optional[Path] = None
    methods: tuple[str, ...] = DEFAULT_EXPLAIN_METHODS
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    top_k: int = 10
    rank_by: str = "score"
    max_length: int = 256
    loss_on: str = "response"
    max_new_tokens: int = 128
    extract_batch_size: int = 8
    lora: LoraSpec = field(default_factory=LoraSpec)
    seed: int = 0
    cache_dir: Optional[Path] = None
    trust_remote_code: bool = False
    tokens: int = 0
    measure: str = "loss"  # what each query's gradient is the gradient of (llm_influence.features.measure)


@dataclass
class Influencer:
    """A training example in a query's top-k; ``score`` in the method's units (higher =
    more helpful to the query's response). ``rank`` is the 1-based competition rank shared
    by equal scores (``1, 2, 2, 4``); ``tied`` says whether another training example (shown
    or not) has exactly this score. ``tokens`` (RepT rows with ``--tokens``): the example's
    highest-scoring tokens, ``{"position", "token", "score"}`` each, best first."""

    rank: int
    score: float
    id: str
    group: str
    prompt: str
    response: str
    tied: bool = False
    tokens: Optional[list[dict[str, Any]]] = None


@dataclass
class Explanation:
    query: Query
    generated: bool
    top: dict[str, list[Influencer]]


@dataclass
class ExplainResult:
    explanations: list[Explanation]
    query_run: Path
    seconds: float
    train_features_reused: bool
    rank_by: str = "score"
    measure: str = "loss"


def read_queries(path: str | Path) -> list[Query]:
    """Queries from a JSONL file: ``prompt`` (required), optional ``response`` and ``id``."""
    path = Path(path)
    queries: list[Query] = []
    seen: dict[str, int] = {}
    for row, (number, obj) in enumerate(iter_json_objects(path)):
        prompt = string_field(path, number, obj, "prompt")
        response = string_field(path, number, obj, "response") if "response" in obj else None
        queries.append(Query(unique_id(path, number, obj, "id", f"q{row}", seen), prompt, response))
    if not queries:
        raise UserError(f"{path}: empty file (no queries)")
    return queries


def args_from_run(run_path: str | Path, checkpoint: str = "last", **overrides: Any) -> ExplainArgs:
    """:class:`ExplainArgs` for a run directory's model, adapter, training set,
    ``max_length`` and ``loss_on`` (``overrides`` set any other field)."""
    run = RunDir(run_path)
    cfg = run.config()
    if "finetune" not in cfg:
        raise UserError(f"{run.config_path}: no 'finetune' section; fine-tune the run first")
    name = run.resolve_checkpoints(checkpoint)[0]
    train = TrainArgs(**cfg["finetune"]["train"])
    return ExplainArgs(model=cfg["finetune"]["model"], train=run.path / "data" / "train.jsonl",
                       adapter=run.checkpoints_root / name, max_length=train.max_length,
                       loss_on=train.loss_on, **overrides)


def _validate(args: ExplainArgs, queries: Sequence[Query]) -> None:
    if not args.methods:
        raise UserError("--methods: give at least one method")
    for name, method in build_methods(list(args.methods), AttributeArgs(method_args=args.method_args)).items():
        if "history" in method.required_features():
            hint = f" or --method-arg {name}.checkpoints=last" if "checkpoints" in method.arguments() else ""
            raise UserError(f"--methods {name}: needs the fine-tuning history; use `attribute` on the run "
                            f"instead{hint}")
    AttributeArgs(measure=args.measure).measurement()  # an invalid measurement is a UserError here
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.tokens < 0:
        raise UserError(f"--tokens must be at least 0, got {args.tokens}")
    if args.tokens and "rept" not in args.methods:
        raise UserError("--tokens: token-level attribution is RepT's; add rept to --methods")
    if args.rank_by not in RANK_BY_CHOICES:
        raise UserError(f"--rank-by must be one of {', '.join(RANK_BY_CHOICES)}, got {args.rank_by!r}")
    if args.max_length < 8:
        raise UserError(f"--max-length must be at least 8, got {args.max_length}")
    if args.loss_on not in LOSS_ON_CHOICES:
        raise UserError(f"--loss-on must be one of {', '.join(LOSS_ON_CHOICES)}, got {args.loss_on!r}")
    if not queries:
        raise UserError("give a --prompt or a --queries file")
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        raise UserError("query ids must be unique")
    if args.adapter is not None:
        adapter = Path(args.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: not a peft adapter folder (no adapter_config.json)")
        if not (adapter / "adapter_model.safetensors").is_file():
            raise UserError(f"{adapter}: no adapter_model.safetensors (pickle-format adapters are not loaded; "
                            "re-save the adapter with safe_serialization=True)")


def _cache_root(args: ExplainArgs) -> Path:
    if args.cache_dir is not None:
        return Path(args.cache_dir)
    from .models.cache import cache_dir

    return cache_dir() / "explain"


def _query_run_key(args: ExplainArgs, train: Sequence[Example]) -> str:
    source = ({"adapter": feature_store.adapter_digest(args.adapter)} if args.adapter is not None
              else {"fresh_lora": args.lora.to_dict(), "seed": args.seed})
    parts = {"format": QUERY_RUN_FORMAT, "model": args.model, **source,
             "train": feature_store.examples_digest(train), "groups": [ex.group for ex in train],
             "max_length": args.max_length, "loss_on": args.loss_on}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One explain at a time per query run (its test split is rewritten per call)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


OPTIMIZER_STATE_FILES = ("optimizer.safetensors", "trainer_state.json")


def _copy_optimizer_state(args: ExplainArgs, checkpoint: Path) -> None:
    """The adapter's AdamW state (a run checkpoint's ``optimizer.safetensors`` and
    ``trainer_state.json``), when it has one, for the optimizer-aware methods (``trackstar``,
    ``less``); each file written atomically, never overwritten."""
    if args.adapter is None or not all((Path(args.adapter) / f).is_file() for f in OPTIMIZER_STATE_FILES):
        return
    for name in OPTIMIZER_STATE_FILES:
        if not (checkpoint / name).is_file():
            with atomic_path(checkpoint / name) as tmp:
                shutil.copyfile(Path(args.adapter) / name, tmp)


def _prepare_query_run(args: ExplainArgs, train: list[Example], folder: Path) -> RunDir:
    """Create (once) the query run's config, training data and adapter checkpoint."""
    run = RunDir(folder)
    checkpoint = run.checkpoints_root / CHECKPOINT
    if run.exists() and (checkpoint / "adapter_model.safetensors").is_file():
        _copy_optimizer_state(args, checkpoint)
        return run
    if args.adapter is not None:
        def write_adapter(tmp: Path) -> None:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(Path(args.adapter) / name, tmp / name)
            _copy_optimizer_state(args, tmp)
    else:
        def write_adapter(tmp: Path) -> None:
            from .models.lora import attach_lora
            from .models.registry import load_model

            base, _, _ = load_model(args.model, trust_remote_code=args.trust_remote_code)
            attach_lora(base, args.lora, seed=args.seed).save_pretrained(str(tmp), safe_serialization=True)
    publish_dir(checkpoint, write_adapter)
    write_examples(run.path / "data" / "train.jsonl", train)
    train_args = replace(TrainArgs(), max_length=args.max_length, loss_on=args.loss_on)
    run.update_config("task", {"name": f"explain:{args.train}", "groups": False,
                               "train_ids": [ex.id for ex in train]})
    run.update_config("finetune", {"model": args.model, "train": asdict(train_args),
                                   "adapter_source": str(args.adapter) if args.adapter else "fresh LoRA",
                                   "lora": args.lora.to_dict() if args.adapter is None else None})
    return run


def _generate_missing(run: RunDir, queries: list[Query], args: ExplainArgs) -> tuple[list[Query], list[bool]]:
    missing = [q for q in queries if q.response is None]
    if not missing:
        return queries, [False] * len(queries)
    from .models.generation import generate
    from .training.load import load_finetuned

    log(f"generating {len(missing)} response(s) greedily (max {args.max_new_tokens} new tokens)")
    model, formatter, _ = load_finetuned(run, CHECKPOINT, trust_remote_code=args.trust_remote_code)
    texts = iter(generate(model, formatter, [q.prompt for q in missing], max_new_tokens=args.max_new_tokens,
                          batch_size=args.extract_batch_size))
    out, generated = [], []
    for q in queries:
        if q.response is None:
            text = next(texts)
            if not text.strip():  # the data reader's rule: a response is never empty or blank
                raise UserError(f"query {q.id!r}: the model generated a blank response; give --response")
            out.append(replace(q, response=text))
            generated.append(True)
        else:
            out.append(q)
            generated.append(False)
    return out, generated


def explain(queries: Sequence[Query], args: ExplainArgs) -> ExplainResult:
    """Rank the training examples of ``args.train`` for every query, per method."""
    t0 = time.time()
    queries = list(queries)
    _validate(args, queries)
    train = read_examples(args.train, id_prefix="train-", required_groups=False)
    folder = _cache_root(args) / _query_run_key(args, train)[:20]
    with _locked(folder):
        run = _prepare_query_run(args, train, folder)
        queries, generated = _generate_missing(run, queries, args)
        test = [Example(id=f"{_QUERY_PREFIX}{i}", prompt=q.prompt, response=q.response or "", group="")
                for i, q in enumerate(queries)]
        write_examples(run.path / "data" / "test.jsonl", test)
        features_before = _train_feature_files(run)
        attribute(run.path, AttributeArgs(methods=tuple(args.methods), method_args=args.method_args,
                                          checkpoint=CHECKPOINT, extract_batch_size=args.extract_batch_size,
                                          trust_remote_code=args.trust_remote_code, measure=args.measure))
        reused = bool(features_before) and features_before == _train_feature_files(run)
        tops: list[dict[str, list[Influencer]]] = [{} for _ in queries]
        for method in args.methods:
            scores, meta = read_scores(run.scores_dir(CHECKPOINT) / f"{method}.safetensors")
            if meta.get("train_ids") != [ex.id for ex in train] or len(meta.get("test_ids", [])) != len(queries):
                raise RuntimeError(f"{method}: scores do not match the query run's examples")
            for i, rows in enumerate(top_influencers(scores, train, args.top_k, rank_by=args.rank_by)):
                tops[i][method] = rows
        if args.tokens:
            attach_token_attribution(run, train, [t["rept"] for t in tops], args.tokens,
                                     batch_size=args.extract_batch_size, trust_remote_code=args.trust_remote_code)
    explanations = [Explanation(q, g, t) for q, g, t in zip(queries, generated, tops)]
    return ExplainResult(explanations, folder, time.time() - t0, reused, args.rank_by,
                         measure=AttributeArgs(measure=args.measure).measurement().spec())


def top_influencers(scores: Any, train: Sequence[Example], top: int,
                    rank_by: str = "score") -> list[list[Influencer]]:
    """Per row of ``scores`` (``[n_queries, n_train]``, higher = more helpful), the top
    ``top`` training examples in :func:`~llm_influence.evaluation.metrics.rank_training`'s
    order under ``rank_by`` (``"score"``: descending score, −IF; ``"abs"``: descending
    ``|score|``, the paper's |IF|), each with its shared rank and tie mark (see the module
    docstring). ``score`` keeps its sign under either ranking."""
    k = min(top, len(train))
    order = np.asarray(rank_training(scores, rank_by))
    ranks = tie_ranks(scores, rank_by)
    tied = np.zeros(ranks.shape, dtype=bool)          # a neighbour in the order shares the rank
    same = ranks[:, 1:] == ranks[:, :-1]
    tied[:, 1:] |= same
    tied[:, :-1] |= same
    values = np.asarray(scores, dtype=np.float64)
    return [[Influencer(rank=int(ranks[i, p]), score=float(values[i, j]), id=train[j].id, group=train[j].group,
                        prompt=train[j].prompt, response=train[j].response, tied=bool(tied[i, p]))
             for p, j in enumerate(order[i, :k].tolist())]
            for i in range(order.shape[0])]


def attach_token_attribution(run: RunDir, train: Sequence[Example], rows_per_query: Sequence[list[Influencer]],
                             n_tokens: int, *, batch_size: int = 8, trust_remote_code: bool = False) -> None:
    """RepT's token-level attribution (:mod:`llm_influence.token_attribution`) for the listed
    RepT influencers of every query (``rows_per_query[i]``, in place): each gets ``tokens``,
    its ``n_tokens`` highest-scoring tokens ``{"position": token index in the training
    example's tokenized prompt + response, "token": its text, "score": cos(s_query,
    [h_q ; dL/dh_q])}`` (ties in position order). The query signatures are the ones the
    sample scores used (the query run's cached features, same layer, arguments and
    measurement); the training tokens come from one batched pass over the listed examples."""
    from .token_attribution import test_signatures, top_tokens

    _, meta = read_scores(run.scores_dir(CHECKPOINT) / "rept.safetensors")
    method, test = test_signatures(run, CHECKPOINT, meta, batch_size=batch_size, trust_remote_code=trust_remote_code)
    index = {ex.id: j for j, ex in enumerate(train)}
    wanted = {i: [index[x.id] for x in rows] for i, rows in enumerate(rows_per_query)}
    found = top_tokens(run, CHECKPOINT, method, test.repgrads, test.repgrads_layer, train, wanted, n_tokens,
                       batch_size=batch_size, trust_remote_code=trust_remote_code)
    for i, rows in enumerate(rows_per_query):
        for x in rows:
            x.tokens = found[i][index[x.id]]


def _train_feature_files(run: RunDir) -> dict[str, float]:
    """``{file: mtime}`` of the training-split feature files (to tell reuse from recompute)."""
    folder = run.features_dir(CHECKPOINT)
    if not folder.is_dir():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("train*")) if p.is_file()}


# -- output ----------------------------------------------------------------------------------

def _influencer_json(x: Influencer) -> dict[str, Any]:
    """Every :class:`Influencer` field; ``tokens`` only where token-level attribution ran."""
    out = asdict(x)
    if out.get("tokens") is None:
        out.pop("tokens", None)
    return out


def to_json(result: ExplainResult) -> dict[str, Any]:
    """The ``--json`` output: the query run, timing, :data:`TIE_NOTE` and, per query, its
    top-k per method (every :class:`Influencer` field)."""
    return {
        "query_run": str(result.query_run),
        "ties": TIE_NOTE,
        "rank_by": result.rank_by,
        "measure": result.measure,
        "seconds": result.seconds,
        "train_features_reused": result.train_features_reused,
        "queries": [{"id": e.query.id, "prompt": e.query.prompt, "response": e.query.response,
                     "generated": e.generated,
                     "top": {m: [_influencer_json(x) for x in rows] for m, rows in e.top.items()}}
                    for e in result.explanations],
    }


CSV_COLUMNS = ("query_id", "query_prompt", "query_response", "generated", "method", "rank", "tied", "score",
               "train_id", "group", "prompt", "response")


def write_csv(path: str | Path, result: ExplainResult) -> Path:
    """One row per (query, method, listed training example), columns :data:`CSV_COLUMNS`
    (``rank`` shared by ties, ``tied`` 0/1); written atomically."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--csv {path}: is a directory")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for e in result.explanations:
                for method, rows in e.top.items():
                    for x in rows:
                        writer.writerow([e.query.id, e.query.prompt, e.query.response, int(e.generated), method,
                                         x.rank, int(x.tied), repr(x.score), x.id, x.group, x.prompt, x.response])
    return path


def excerpt(text: str, width: int = 60) -> str:
    """One line of at most ``width`` characters (newlines shown as spaces)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def print_tables(result: ExplainResult, console=None) -> None:
    """Rich tables: per query and method, rank (``3=`` when tied), score, id, group and text
    excerpts; then one line with :data:`TIE_NOTE`."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    for e in result.explanations:
        label = "generated" if e.generated else "given"
        console.print(f"[bold]{escape(e.query.id)}[/bold]: {escape(excerpt(e.query.prompt, 100))}")
        console.print(f"  response ({label}): {escape(excerpt(e.query.response or '', 100))}")
        for method, rows in e.top.items():
            table = Table(title=f"{method}: top {len(rows)}", title_justify="left")
            with_tokens = any(x.tokens is not None for x in rows)
            for col in ("rank", "score", "id", "group", "prompt", "response") + (("top tokens",) if with_tokens else ()):
                table.add_column(col, justify="right" if col in ("rank", "score") else "left",
                                 overflow="fold" if col in ("prompt", "response", "top tokens") else "ellipsis")
            for x in rows:
                cells = [f"{x.rank}=" if x.tied else str(x.rank), f"{x.score:.4g}", escape(x.id),
                         escape(x.group or "-"), escape(excerpt(x.prompt)), escape(excerpt(x.response))]
                if with_tokens:
                    cells.append(escape(" ".join(f"{t['token']!r}({t['score']:.3g})" for t in x.tokens or [])))
                table.add_row(*cells)
            console.print(table)
    console.print(escape(f"Ties: {TIE_NOTE}."))
