"""Data on a fresh machine: download every file the project reads from its upstream
repository at a pinned commit, convert it, check it against the shipped SHA-256 sums and
put it in place.

The data directory (``shared/data/README.md`` documents every file) is only on the machines
it was laid out on; a clone elsewhere has none. :func:`fetch` rebuilds it from the public
sources listed in :data:`DATA_FILES`, one :class:`DataFile` per file: destination path,
upstream ``owner/repo``, pinned commit, path in that repository and conversion:

* ``copy``: the upstream bytes, verbatim (AdvBench CSVs, MNIST ``.gz``).
* ``arrow-jsonl``: a HuggingFace ``save_to_disk`` table (``data-00000-of-00001.arrow``,
  Arrow IPC *stream* format; the IPC *file* format is accepted too) to JSONL, losslessly:
  one JSON object per line (``json.dumps(row, ensure_ascii=False)``, keys in column order,
  ``\\n`` line ends), line *i* = row *i*. Read with ``pyarrow``: a hand-written IPC reader
  would have to follow the flatbuffer metadata, buffers, alignment, dictionaries and
  compression of every writer version, which is what pyarrow already does robustly.
  (Checked once against the real upstream tables at the pinned commits: all 28 convert
  to exactly the shipped sums.)
* ``packaged``: ``refusal_prefixes.json``. Upstream has no such file: it is a small JSON
  document written for this project (description, provenance, matching rule) around four
  string lists extracted verbatim, in order, from llm-attacks@0f505d8
  (``experiments/evaluate.py``, ``experiments/evaluate_individual.py``,
  ``llm_attacks/base/attack_manager.py``, ``demo.ipynb``). Its bytes cannot be rebuilt from
  those sources, so the file (4,285 bytes, MIT, "Copyright (c) 2023 Andy Zou"; its
  ``source`` field records repository, commit and git blobs) ships inside this package
  and is copied from there.

Downloads come from ``https://raw.githubusercontent.com/{owner}/{repo}/{commit}/{path}``,
or from a mirror with the same layout (``{base}/{owner}/{repo}/{commit}/{path}``): the
``base_url`` argument, else ``$LLM_INFLUENCE_DATA_MIRROR``. ``http``, ``https`` and
``file`` URLs are accepted; only the standard library (urllib) is used.

Guarantees, per file:

* A file already present whose sum matches is skipped (no request), so a re-run is cheap;
  one whose sum does not match is fetched again and replaced.
* The download goes to ``NAME.part`` in the destination folder. If the connection fails
  or times out, that partial file is kept and the next attempt (a retry, or the next run)
  asks for the rest with an HTTP ``Range`` request; a server that answers ``206`` with the
  matching ``Content-Range`` is appended to, any other answer restarts from byte 0.
* The converted file is written to a temporary file next to its destination, its SHA-256
  is checked against ``SHA256SUMS`` shipped in this package, and only then is it renamed
  into place. A mismatch, or upstream bytes that cannot be converted, is refused with a
  :class:`~llm_influence.errors.UserError` naming the file (with expected and actual
  sums) and removes the ``.part`` and the temporary file: nothing half-written or
  unverified is ever left under a final name, and a re-run downloads the file whole.

Files are fetched one after another; two fetches into the same folder at once are not
supported (they would share the ``.part`` files).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Optional

from .. import __version__
from ..errors import UserError
from ..io_utils import atomic_path, sha256_file

MIRROR_ENV = "LLM_INFLUENCE_DATA_MIRROR"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
SUMS_FILE = "SHA256SUMS"

COPY = "copy"
ARROW_JSONL = "arrow-jsonl"
PACKAGED = "packaged"
CONVERSIONS = (COPY, ARROW_JSONL, PACKAGED)

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 3
_CHUNK = 1 << 16
_RETRY_HTTP = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class DataFile:
    """One file of the data directory and where it comes from.

    ``path`` is relative to the data directory; ``source`` is the path inside ``repo`` at
    ``commit`` (for ``packaged``, the upstream files the content was extracted from, and
    ``resource`` names the package file it is copied from)."""

    path: str
    repo: str
    commit: str
    source: str
    conversion: str
    resource: Optional[str] = field(default=None)

    def url(self, base_url: str = DEFAULT_BASE_URL) -> str:
        """``{base}/{owner}/{repo}/{commit}/{source}`` (the source path URL-quoted)."""
        if self.conversion == PACKAGED:
            raise ValueError(f"{self.path} ships with the package; it has no download URL")
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{urllib.parse.quote(self.source)}"


_PAPER = "plumprc/Failures-of-Influence-Functions-in-LLMs"
_PAPER_V2 = "93f9489872c0ee33d05c7b7316f48f6256e47a86"
_PAPER_V1 = "a514fa660337f6b99904e2773878423ba539a75f"
_DATAINF = "ykwon0407/DataInf"
_DATAINF_COMMIT = "fe9145aa321d2bda563d78913d706fdb36947c12"
_LLM_ATTACKS = "llm-attacks/llm-attacks"
_LLM_ATTACKS_COMMIT = "0f505d82e25c15a83b6954db28191b69927a255d"
_MNIST = "vinay030901/PytorchCourse"
_MNIST_COMMIT = "6c04f5f7e48193a165719f8cca287cccdd81d9a1"
_ARROW = "data-00000-of-00001.arrow"


def _paper_v2(name: str, split: str) -> DataFile:
    return DataFile(f"paper/v2_93f9489/{name}_{split}.jsonl", _PAPER, _PAPER_V2,
                    f"datasets/{name}/{split}/{_ARROW}", ARROW_JSONL)


def _paper_v1(name: str, split: str) -> DataFile:
    return DataFile(f"paper/v1_a514fa6/{name}_{split}.jsonl", _PAPER, _PAPER_V1,
                    f"datasets/{name}_{split}/{_ARROW}", ARROW_JSONL)


def _datainf(name: str, split: str) -> DataFile:
    return DataFile(f"datainf/{name}_{split}.jsonl", _DATAINF, _DATAINF_COMMIT,
                    f"datasets/{name}_{split}.hf/{_ARROW}", ARROW_JSONL)


def _advbench(name: str) -> DataFile:
    return DataFile(f"advbench/{name}", _LLM_ATTACKS, _LLM_ATTACKS_COMMIT, f"data/advbench/{name}", COPY)


def _mnist(name: str) -> DataFile:
    return DataFile(f"mnist/{name}", _MNIST, _MNIST_COMMIT, f"MNIST/raw/{name}", COPY)


DATA_FILES: tuple[DataFile, ...] = (
    _advbench("harmful_behaviors.csv"),
    _advbench("harmful_strings.csv"),
    DataFile("refusal_prefixes.json", _LLM_ATTACKS, _LLM_ATTACKS_COMMIT,
             "experiments/evaluate.py, experiments/evaluate_individual.py, "
             "llm_attacks/base/attack_manager.py, demo.ipynb", PACKAGED, resource="refusal_prefixes.json"),
    _datainf("grammars", "train"),
    _datainf("grammars", "test"),
    _datainf("math_with_reason", "train"),
    _datainf("math_with_reason", "test"),
    _datainf("math_without_reason", "train"),
    _datainf("math_without_reason", "test"),
    _paper_v2("mixedS", "train"),
    _paper_v2("mixedS", "test"),
    _paper_v2("mixedL", "train"),
    _paper_v2("mixedL", "test"),
    _paper_v2("emotion", "train"),
    _paper_v2("emotion", "test"),
    _paper_v2("grammars", "train"),
    _paper_v2("grammars", "test"),
    _paper_v2("math", "train"),
    _paper_v2("math", "test"),
    _paper_v2("backdoor", "train"),
    _paper_v2("backdoor", "test"),
    _paper_v2("multibackdoor", "train"),
    _paper_v2("multibackdoor", "test"),
    _paper_v2("multibackdoor5", "train"),
    _paper_v2("multibackdoor5", "test"),
    _paper_v1("harmfulCheck", "train"),
    _paper_v1("harmfulCheck", "test"),
    _paper_v1("alpaca_mix", "train"),
    _paper_v1("alpaca_mix", "test"),
    _paper_v1("grammars", "train"),
    _paper_v1("grammars", "test"),
    _mnist("t10k-images-idx3-ubyte.gz"),
    _mnist("t10k-labels-idx1-ubyte.gz"),
)


@dataclass
class FetchResult:
    """What :func:`fetch` did, by destination path (relative to ``directory``)."""

    directory: Path
    downloaded: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Transient(Exception):
    """A download attempt that may succeed when resumed (connection lost, time-out)."""


class _Permanent(Exception):
    """A download that retrying will not fix (HTTP 404, no such file on a file:// mirror)."""


class NotArrowError(UserError):
    """Bytes that are not an Arrow IPC stream or file (``detail`` says why)."""

    def __init__(self, src: str | Path, detail: str) -> None:
        super().__init__(f"{src}: {detail}")
        self.detail = detail


def expected_sums() -> dict[str, str]:
    """``path -> sha256`` from the ``SHA256SUMS`` shipped in this package."""
    text = resources.files(__package__).joinpath(SUMS_FILE).read_text(encoding="utf-8")
    sums: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def select_files(paths: Optional[Iterable[str]] = None) -> list[DataFile]:
    """The table entries for ``paths`` (all of :data:`DATA_FILES` when ``None``)."""
    if paths is None:
        return list(DATA_FILES)
    paths = list(paths)
    by_path = {f.path: f for f in DATA_FILES}
    unknown = [p for p in paths if p not in by_path]
    if unknown:
        raise UserError(f"unknown data file {unknown[0]!r}; known: {', '.join(by_path)}")
    return [by_path[p] for p in paths]


def resolve_base_url(base_url: Optional[str] = None) -> str:
    """The argument, else ``$LLM_INFLUENCE_DATA_MIRROR``, else raw.githubusercontent.com."""
    base = base_url or os.environ.get(MIRROR_ENV) or DEFAULT_BASE_URL
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme not in ("http", "https", "file"):
        source = "--mirror" if base_url else f"${MIRROR_ENV}"
        raise UserError(f"{source} {base!r}: expected an http://, https:// or file:// URL")
    return base


def verify(data_dir: str | Path, paths: Optional[Iterable[str]] = None) -> list[str]:
    """One line per problem (``PATH: missing`` or ``PATH: sha256 mismatch (expected WANT, got GOT)``) for
    the files of :data:`DATA_FILES` (or ``paths``) under ``data_dir``; empty when all match."""
    root = Path(data_dir)
    sums = expected_sums()
    problems = []
    for f in select_files(paths):
        target = root / f.path
        if not target.is_file():
            problems.append(f"{target}: missing")
            continue
        got = sha256_file(target)
        if got != sums[f.path]:
            problems.append(f"{target}: sha256 mismatch (expected {sums[f.path]}, got {got})")
    return problems


def fetch(
    dest: str | Path,
    base_url: Optional[str] = None,
    *,
    paths: Optional[Iterable[str]] = None,
    quiet: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    retry_wait: float = 1.0,
) -> FetchResult:
    """Download, convert, verify and place every file of :data:`DATA_FILES` (or ``paths``)
    under ``dest``, stopping at the first failure (:class:`UserError`; the files already
    placed stay, verified, and a re-run skips them).

    ``timeout`` bounds each connect and read (seconds); a lost connection or time-out is
    retried ``retries`` times, resuming the ``.part`` file, after ``retry_wait`` × attempt
    seconds."""
    root = Path(dest).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: not a directory (data fetch --to)")
    root.mkdir(parents=True, exist_ok=True)
    base = resolve_base_url(base_url)
    sums = expected_sums()
    say: Callable[[str], None] = (lambda m: None) if quiet else _log
    result = FetchResult(directory=root)
    for f in select_files(paths):
        target = root / f.path
        want = sums.get(f.path)
        if want is None:
            raise RuntimeError(f"{f.path}: no sum in the package's {SUMS_FILE}")  # a packaging bug
        if target.is_file():
            if sha256_file(target) == want:
                result.skipped.append(f.path)
                continue
            say(f"{target}: sha256 does not match {SUMS_FILE}; fetching it again")
        if f.conversion == PACKAGED:
            _place_packaged(f, target, want)
            result.copied.append(f.path)
            say(f"{target}: copied from the llm_influence package (provenance: {f.repo}@{f.commit[:7]})")
            continue
        url = f.url(base)
        part = target.with_name(target.name + ".part")
        target.parent.mkdir(parents=True, exist_ok=True)
        resumed = _download_with_retries(url, part, target, timeout=timeout, retries=retries,
                                         retry_wait=retry_wait, say=say)
        _place_download(f, part, target, want, url, resumed=resumed)
        result.downloaded.append(f.path)
        say(f"{target}: fetched and verified ({target.stat().st_size:,} bytes) from {url}")
    return result


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mismatch(target: Path, want: str, got: str, origin: str, hint: str = "") -> UserError:
    return UserError(f"{target}: sha256 mismatch, refused (expected {want}, got {got}; from {origin}){hint}")


def _place_packaged(f: DataFile, target: Path, want: str) -> None:
    data = resources.files(__package__).joinpath(f.resource or f.path).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise _mismatch(target, want, got, f"package file llm_influence/data/{f.resource}")
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def _place_download(f: DataFile, part: Path, target: Path, want: str, url: str, *, resumed: bool) -> None:
    """Convert ``part`` into a temporary file, check its sum, rename it onto ``target``;
    ``part`` is removed whatever happens (a complete download that fails is refused)."""
    # a resumed download may have started from another version's bytes: a re-run starts afresh
    hint = "; it was resumed from an earlier partial download: run again to download it whole" if resumed else ""
    try:
        with atomic_path(target) as tmp:
            if f.conversion == ARROW_JSONL:
                try:
                    arrow_to_jsonl(part, tmp)
                except NotArrowError as exc:
                    raise UserError(f"{target}: refused: {url} is {exc.detail}{hint}") from None
            elif f.conversion == COPY:
                os.replace(part, tmp)
            else:
                raise RuntimeError(f"{f.path}: unknown conversion {f.conversion!r}")
            got = sha256_file(tmp)
            if got != want:
                raise _mismatch(target, want, got, url, hint)
    finally:
        if part.exists():
            part.unlink()


def arrow_to_jsonl(src: str | Path, dst: str | Path) -> int:
    """Write the rows of the Arrow table ``src`` (IPC stream, or IPC file) to ``dst`` as
    JSONL (see the module docstring); returns the number of rows. :class:`NotArrowError`
    if ``src`` is not an Arrow table."""
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        raise UserError("pyarrow is needed to convert the upstream arrow tables: pip install pyarrow") from None
    data = Path(src).read_bytes()
    try:
        try:
            table = ipc.open_stream(pa.BufferReader(data)).read_all()
        except pa.ArrowInvalid:
            table = ipc.open_file(pa.BufferReader(data)).read_all()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        detail = f"not a readable Arrow table ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        raise NotArrowError(src, detail) from None
    rows = 0
    with open(dst, "w", encoding="utf-8", newline="\n") as out:
        for batch in table.to_batches():
            for row in batch.to_pylist():
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows += 1
    return rows


def _download_with_retries(url: str, part: Path, target: Path, *, timeout: float, retries: int,
                           retry_wait: float, say: Callable[[str], None]) -> bool:
    """:func:`_download` with retries; whether the bytes were resumed from a partial download."""
    for attempt in range(retries + 1):
        try:
            return _download(url, part, timeout=timeout)
        except _Permanent as exc:
            raise UserError(f"{target}: download from {url} failed: {exc}") from None
        except _Transient as exc:
            if attempt == retries:
                kept = part.is_file() and part.stat().st_size > 0
                hint = (f"{part.stat().st_size:,} bytes kept in {part.name}; run again to resume" if kept
                        else "run again to retry")
                raise UserError(f"{target}: download from {url} failed: {exc}; {hint}") from None
            say(f"{target}: {exc}; retrying (attempt {attempt + 2} of {retries + 1})")
            time.sleep(retry_wait * (attempt + 1))
    raise AssertionError("unreachable")


def _download(url: str, part: Path, *, timeout: float) -> bool:
    """Fetch ``url`` into ``part``, resuming from its current size when the server honours
    ``Range`` (returns whether it did). Raises :class:`_Transient` for failures worth a retry, :class:`_Permanent`
    for the others (HTTP 404, ...)."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"llm-influence/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # the range does not fit what the server has: restart
            part.unlink()
            return _download(url, part, timeout=timeout)
        if exc.code in _RETRY_HTTP:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise _Permanent(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):  # a file:// mirror without the file
            raise _Permanent("no such file") from None
        raise _Transient(_reason(exc)) from None
    except (http.client.HTTPException, OSError) as exc:
        raise _Transient(_reason(exc)) from None
    with response:
        status = getattr(response, "status", None) or 200
        start = _range_start(response.headers.get("Content-Range"))
        if status == 206 and start != offset:
            if not offset:
                raise _Permanent(f"HTTP 206 with a range from byte {start} to a request for the whole file")
            response.close()
            part.unlink()  # an unexpected range: start again from byte 0
            return _download(url, part, timeout=timeout)
        append = status == 206
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        got = 0
        # read1: what has arrived, not a full chunk, so bytes received before a time-out are kept
        read = getattr(response, "read1", response.read)
        with open(part, "ab" if append else "wb") as out:  # errors writing it are the user's OSError
            while True:
                try:
                    chunk = read(_CHUNK)
                except (http.client.HTTPException, OSError) as exc:
                    raise _Transient(_reason(exc)) from None
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
        if expected is not None and got < expected:
            raise _Transient(f"connection closed after {got:,} of {expected:,} bytes")
        return append


def _range_start(content_range: Optional[str]) -> Optional[int]:
    match = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    """``URLError(timeout('timed out'))`` -> ``'timeout: timed out'``."""
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, str):
        return reason
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
