"""``data fetch`` / ``data verify`` (llm_influence.data.fetch, .commands) without the internet.

A local HTTP server on 127.0.0.1 serves files laid out like the upstream repositories
(``/{owner}/{repo}/{commit}/{path}``), built here from the data directory
(``$LLM_INFLUENCE_DATA``): the CSVs and MNIST verbatim, and the JSONL files written back as
Arrow IPC streams with pyarrow (column order and types as upstream: strings, DataInf math
``answer`` int64), as HuggingFace ``save_to_disk`` stores them. The server can corrupt a
file, cut the connection after N bytes, stall, or ignore ``Range``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import pyarrow as pa  # a dependency of the package (the arrow -> JSONL conversion)
import pyarrow.ipc
import pytest

from llm_influence.data import commands
from llm_influence.data import fetch as fetch_mod
from llm_influence.data.fetch import (
    ARROW_JSONL, CONVERSIONS, COPY, DATA_FILES, MIRROR_ENV, PACKAGED, DataFile, expected_sums, fetch, verify,
)
from llm_influence.errors import UserError

PACKAGE_DIR = Path(fetch_mod.__file__).parent
BY_PATH = {f.path: f for f in DATA_FILES}
CSV = "advbench/harmful_behaviors.csv"
MNIST = "mnist/t10k-labels-idx1-ubyte.gz"
DATAINF_MATH = "datainf/math_with_reason_test.jsonl"
PAPER = "paper/v2_93f9489/mixedS_train.jsonl"
BIG_ARROW = "paper/v2_93f9489/multibackdoor5_train.jsonl"
REFUSAL = "refusal_prefixes.json"
ONE_OF_EACH = [CSV, MNIST, DATAINF_MATH, PAPER, REFUSAL]


# ----------------------------------------------------------------------------- upstream


def arrow_stream(jsonl: Path) -> bytes:
    """The JSONL rows as an Arrow IPC stream: columns in key order, int -> int64, str -> string."""
    return arrow_from_text(jsonl.read_text(encoding="utf-8"))


def arrow_from_text(text: str) -> bytes:
    rows = [json.loads(line) for line in text.splitlines()]
    schema = pa.schema([(k, pa.int64() if isinstance(v, int) else pa.string()) for k, v in rows[0].items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=256)  # several record batches, as large tables have
    return sink.getvalue()


def url_path(f: DataFile) -> str:
    return f"/{f.repo}/{f.commit}/{f.source}"


@pytest.fixture(scope="module")
def upstream(data_dir: Path) -> dict[str, bytes]:
    """URL path -> bytes for every downloadable file of the table."""
    files = {}
    for f in DATA_FILES:
        if f.conversion == COPY:
            files[url_path(f)] = (data_dir / f.path).read_bytes()
        elif f.conversion == ARROW_JSONL:
            files[url_path(f)] = arrow_stream(data_dir / f.path)
    return files


class Upstream:
    """A threaded HTTP server over ``files`` with fault injection (see the module docstring)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, Optional[str]]] = []  # (path, Range header)
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before closing, once
        self.stall_after: dict[str, int] = {}  # path -> bytes sent before stalling, once
        self.ranges = True
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner._get(self)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(h.path)
        rng = h.headers.get("Range")
        self.requests.append((path, rng))
        body = self.files.get(path)
        if body is None:
            h.send_error(404)
            return
        start, status = 0, 200
        if rng and self.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                h.send_error(416)
                return
            status = 206
        payload = body[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(payload)))
        h.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        h.end_headers()
        if path in self.cut_after:
            h.wfile.write(payload[:self.cut_after.pop(path)])
            h.wfile.flush()
            h.close_connection = True
        elif path in self.stall_after:
            h.wfile.write(payload[:self.stall_after.pop(path)])
            h.wfile.flush()
            self.release.wait(10)
            h.close_connection = True
        else:
            h.wfile.write(payload)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(upstream):
    srv = Upstream(upstream)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """A call that forgot its mirror goes to the discard port on 127.0.0.1, not to GitHub."""
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-influence")
    commands.add_data_parser(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    return ns.func(ns)


# ----------------------------------------------------------------------------- the table


def test_table_covers_the_shipped_sums_and_package_data(data_dir):
    assert len({f.path for f in DATA_FILES}) == len(DATA_FILES)
    assert {f.path for f in DATA_FILES} == set(expected_sums())
    assert (PACKAGE_DIR / "SHA256SUMS").read_bytes() == (data_dir / "SHA256SUMS").read_bytes()
    assert (PACKAGE_DIR / REFUSAL).read_bytes() == (data_dir / REFUSAL).read_bytes()
    assert {f.conversion for f in DATA_FILES} == set(CONVERSIONS)
    for f in DATA_FILES:
        assert re.fullmatch(r"[0-9a-f]{40}", f.commit) and f.repo.count("/") == 1, f
        assert (f.resource is not None) == (f.conversion == PACKAGED)
    assert [f.path for f in DATA_FILES if f.conversion == PACKAGED] == [REFUSAL]


def test_default_url_is_raw_github_at_the_pinned_commit():
    assert BY_PATH[PAPER].url() == (
        "https://raw.githubusercontent.com/plumprc/Failures-of-Influence-Functions-in-LLMs/"
        "93f9489872c0ee33d05c7b7316f48f6256e47a86/datasets/mixedS/train/data-00000-of-00001.arrow")
    assert BY_PATH[MNIST].url("http://m.example/base/") == (
        "http://m.example/base/vinay030901/PytorchCourse/6c04f5f7e48193a165719f8cca287cccdd81d9a1/"
        "MNIST/raw/t10k-labels-idx1-ubyte.gz")


def test_served_arrow_tables_have_the_upstream_columns(upstream):
    def schema(path: str) -> list[tuple[str, str]]:
        s = pa.ipc.open_stream(pa.BufferReader(upstream[url_path(BY_PATH[path])])).schema
        return [(f.name, str(f.type)) for f in s]

    assert schema(DATAINF_MATH) == [("prompt", "string"), ("text", "string"), ("answer", "int64"),
                                    ("reason", "string"), ("variation", "string")]
    assert schema("datainf/math_without_reason_train.jsonl") == [
        ("prompt", "string"), ("text", "string"), ("answer", "int64"), ("variation", "string")]
    assert schema("datainf/grammars_train.jsonl") == [(c, "string") for c in ("prompt", "text", "answer", "variation")]
    assert schema(PAPER) == [("prompts", "string"), ("response", "string"), ("variation", "string")]


# ----------------------------------------------------------------------------- (a), (e)


def test_fetch_one_file_of_each_kind_into_an_empty_dir(server, tmp_path):
    dest = tmp_path / "data"
    result = fetch(dest, server.url, paths=ONE_OF_EACH, quiet=True)
    assert sorted(result.downloaded) == sorted([CSV, MNIST, DATAINF_MATH, PAPER])
    assert result.copied == [REFUSAL] and result.skipped == []
    sums = expected_sums()
    for path in ONE_OF_EACH:
        assert sha((dest / path).read_bytes()) == sums[path], path
    assert verify(dest, ONE_OF_EACH) == []
    assert files_under(dest) == sorted(ONE_OF_EACH)  # no .part, no temporary file


def test_cli_fetch_full_table_verify_and_rerun_skips(server, tmp_path, capsys, data_dir):
    dest = tmp_path / "fresh"
    assert run_cli(["data", "fetch", "--to", str(dest), "--mirror", server.url, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # --quiet: the summary only
    summary = out.strip()
    assert "\n" not in summary and str(dest.resolve()) in summary
    assert f"{len(DATA_FILES) - 1} downloaded, 1 copied from the package, 0 already present" in summary
    assert f"LLM_INFLUENCE_DATA={dest.resolve()}" in summary and f"--data-dir {dest.resolve()}" in summary
    assert files_under(dest) == sorted(f.path for f in DATA_FILES)
    for f in DATA_FILES:
        assert (dest / f.path).read_bytes() == (data_dir / f.path).read_bytes(), f.path
    assert len(server.requests) == len(DATA_FILES) - 1 and all(r is None for _, r in server.requests)

    assert run_cli(["data", "verify", "--data-dir", str(dest)]) == 0
    assert "all 33 data files present" in capsys.readouterr().out

    # (e) a re-run is cheap: every file verified in place, no request, nothing rewritten
    server.requests.clear()
    before = {p: (dest / p).stat().st_mtime_ns for p in files_under(dest)}
    assert run_cli(["data", "fetch", "--to", str(dest), "--mirror", server.url]) == 0
    assert f"0 downloaded, 0 copied from the package, {len(DATA_FILES)} already present, skipped" in capsys.readouterr().out
    assert server.requests == []
    assert {p: (dest / p).stat().st_mtime_ns for p in files_under(dest)} == before


def test_mirror_from_the_environment_and_a_replaced_bad_local_file(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MIRROR_ENV, server.url)
    dest = tmp_path / "d"
    (dest / "advbench").mkdir(parents=True)
    (dest / CSV).write_text("goal,target\nstale\n")
    result = fetch(dest, paths=[CSV, MNIST])
    assert result.downloaded == [CSV, MNIST]
    assert "does not match SHA256SUMS; fetching it again" in capsys.readouterr().err
    assert verify(dest, [CSV, MNIST]) == []


# ----------------------------------------------------------------------------- (b)


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _changed_value_arrow(data_dir: Path) -> bytes:
    """A valid Arrow stream of the table with one string of one row changed."""
    return arrow_from_text((data_dir / PAPER).read_text(encoding="utf-8").replace("harmful", "harmfuL", 1))


@pytest.mark.parametrize("case", ["csv-byte-flipped", "arrow-value-changed", "arrow-garbage"])
def test_corrupted_upstream_file_is_refused_and_nothing_is_left(server, tmp_path, data_dir, case):
    bad = {"csv-byte-flipped": CSV, "arrow-value-changed": PAPER, "arrow-garbage": PAPER}[case]
    key = url_path(BY_PATH[bad])
    if case == "csv-byte-flipped":
        server.files[key] = _flip_byte(server.files[key], 5000)
    elif case == "arrow-value-changed":
        server.files[key] = _changed_value_arrow(data_dir)
    else:
        server.files[key] = b"<html>rate limited</html>\n" * 40
    dest = tmp_path / "data"
    with pytest.raises(UserError) as info:
        fetch(dest, server.url, paths=[MNIST, bad], quiet=True, retries=0)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{dest / bad}: ")
    if case == "arrow-garbage":
        assert "not a readable Arrow table" in message and BY_PATH[bad].url(server.url) in message
    else:
        want = expected_sums()[bad]
        got = sha(server.files[key]) if case == "csv-byte-flipped" else None
        assert f"expected {want}" in message and "refused" in message
        if got:
            assert f"got {got}" in message
    assert info.value.exit_status == 2
    # the file fetched before stays (verified); the refused one is gone, with its .part and temp
    assert files_under(dest) == [MNIST]
    assert verify(dest, [MNIST]) == []


# ----------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("path", [CSV, BIG_ARROW])
def test_cut_connection_keeps_a_part_that_the_next_run_resumes_with_range(server, tmp_path, path):
    key = url_path(BY_PATH[path])
    cut = 10_000
    server.cut_after[key] = cut
    dest = tmp_path / "data"
    with pytest.raises(UserError) as info:
        fetch(dest, server.url, paths=[path], quiet=True, retries=0)
    message = str(info.value)
    assert message.startswith(f"{dest / path}: download from ") and "run again to resume" in message
    assert f"connection closed after {cut:,} of {len(server.files[key]):,} bytes" in message
    part = dest / (path + ".part")
    assert files_under(dest) == [path + ".part"]  # no final file; the partial download is kept
    assert part.read_bytes() == server.files[key][:cut]

    server.requests.clear()
    result = fetch(dest, server.url, paths=[path], quiet=True, retries=0)
    assert result.downloaded == [path]
    assert server.requests == [(key, f"bytes={cut}-")]
    assert files_under(dest) == [path] and verify(dest, [path]) == []


def test_cut_connection_is_resumed_within_one_run(server, tmp_path):
    key = url_path(BY_PATH[CSV])
    server.cut_after[key] = 777
    dest = tmp_path / "data"
    result = fetch(dest, server.url, paths=[CSV], quiet=True, retries=2, retry_wait=0)
    assert result.downloaded == [CSV]
    assert server.requests == [(key, None), (key, "bytes=777-")]
    assert files_under(dest) == [CSV] and verify(dest, [CSV]) == []


def test_a_server_without_range_support_restarts_from_byte_zero(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "data"
    (dest / "advbench").mkdir(parents=True)
    (dest / (CSV + ".part")).write_bytes(b"x" * 300)  # a stale partial download
    result = fetch(dest, server.url, paths=[CSV], quiet=True, retries=0)
    assert result.downloaded == [CSV]
    assert server.requests == [(url_path(BY_PATH[CSV]), "bytes=300-")]  # asked, got 200, rewrote
    assert files_under(dest) == [CSV] and verify(dest, [CSV]) == []


def test_a_foreign_part_file_is_refused_once_then_fetched_cleanly(server, tmp_path):
    dest = tmp_path / "data"
    (dest / "advbench").mkdir(parents=True)
    (dest / (CSV + ".part")).write_bytes(b"not the upstream bytes")
    with pytest.raises(UserError, match="sha256 mismatch, refused .*resumed from an earlier partial download"):
        fetch(dest, server.url, paths=[CSV], quiet=True, retries=0)
    assert files_under(dest) == []  # the bad .part is removed with the refused result
    fetch(dest, server.url, paths=[CSV], quiet=True, retries=0)
    assert verify(dest, [CSV]) == []


def test_a_stalled_server_times_out_and_the_part_is_resumed(server, tmp_path):
    key = url_path(BY_PATH[CSV])
    server.stall_after[key] = 4096
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="timed out"):
        fetch(dest, server.url, paths=[CSV], quiet=True, retries=0, timeout=0.5)
    assert files_under(dest) == [CSV + ".part"]
    assert (dest / (CSV + ".part")).read_bytes() == server.files[key][:4096]  # what arrived is kept
    server.release.set()
    fetch(dest, server.url, paths=[CSV], quiet=True, retries=0)
    assert server.requests[-1] == (key, "bytes=4096-")
    assert files_under(dest) == [CSV] and verify(dest, [CSV]) == []


def test_a_server_that_went_away_fails_cleanly(upstream, tmp_path):
    gone = Upstream(upstream)
    gone.stop()
    dest = tmp_path / "data"
    with pytest.raises(UserError) as info:
        fetch(dest, gone.url, paths=[CSV, PAPER], quiet=True, retries=1, retry_wait=0)
    assert str(info.value).startswith(f"{dest / CSV}: download from {gone.url}/") and "run again" in str(info.value)
    assert files_under(dest) == []


def test_http_404_is_a_user_error_without_retries(server, tmp_path):
    key = url_path(BY_PATH[CSV])
    del server.files[key]
    with pytest.raises(UserError) as info:
        fetch(tmp_path / "d", server.url, paths=[CSV], quiet=True, retries=3, retry_wait=0)
    assert str(info.value) == f"{tmp_path / 'd' / CSV}: download from {server.url}{key} failed: HTTP 404 Not Found"
    assert server.requests == [(key, None)]
    assert files_under(tmp_path / "d") == []


def test_a_file_mirror_works_and_a_missing_file_is_named(upstream, tmp_path):
    mirror = tmp_path / "mirror"
    key = url_path(BY_PATH[DATAINF_MATH])
    (mirror / key.lstrip("/")).parent.mkdir(parents=True)
    (mirror / key.lstrip("/")).write_bytes(upstream[key])
    dest = tmp_path / "data"
    assert fetch(dest, mirror.as_uri(), paths=[DATAINF_MATH], quiet=True).downloaded == [DATAINF_MATH]
    assert verify(dest, [DATAINF_MATH]) == []
    with pytest.raises(UserError, match=rf"^{re.escape(str(dest / CSV))}: download from file://.*: no such file$"):
        fetch(dest, mirror.as_uri(), paths=[CSV], quiet=True)
    assert files_under(dest) == [DATAINF_MATH]


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--mirror 'ftp://x': expected an http"):
        fetch(tmp_path / "d", "ftp://x", paths=[CSV], quiet=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        fetch(tmp_path / "file", "http://127.0.0.1:9", quiet=True)
    with pytest.raises(UserError, match="unknown data file"):
        verify(tmp_path, ["nope.jsonl"])


# ----------------------------------------------------------------------------- (d)


def test_verify_passes_on_the_data_directory(data_dir):
    assert verify(data_dir) == []


def test_verify_names_the_one_changed_file(data_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    for f in DATA_FILES:
        (copy / f.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / f.path, copy / f.path)
    changed = copy / "paper/v2_93f9489/emotion_test.jsonl"
    changed.write_bytes(_flip_byte(changed.read_bytes(), 1234))
    problems = verify(copy)
    assert len(problems) == 1 and problems[0].startswith(f"{changed}: sha256 mismatch")

    with pytest.raises(UserError) as info:
        run_cli(["data", "verify", "--data-dir", str(copy)])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{changed}: ") and info.value.exit_status == 2
    assert f"expected {expected_sums()['paper/v2_93f9489/emotion_test.jsonl']}" in message

    (copy / MNIST).unlink()
    with pytest.raises(UserError, match=r"\(and 1 more problem\(s\)\)"):
        run_cli(["data", "verify", "--data-dir", str(copy)])
    assert verify(copy)[1] == f"{copy / MNIST}: missing"


def test_verify_defaults_to_the_environment(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("LLM_INFLUENCE_DATA", str(data_dir))
    assert run_cli(["data", "verify"]) == 0
    assert str(data_dir) in capsys.readouterr().out


# ----------------------------------------------------------------------------- the parser


def test_every_data_option_has_help():
    top = parser()
    data = top._subparsers._group_actions[0].choices["data"]
    subs = data._subparsers._group_actions[0].choices
    assert set(subs) == {"fetch", "verify"}
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    with pytest.raises(SystemExit):
        top.parse_args(["data", "fetch"])  # --to is required
    with pytest.raises(SystemExit):
        top.parse_args(["data"])  # a subcommand is required


# ----------------------------------------------------------------------------- make demo's data step

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None or not (Path(sys.executable).parent / "llm-influence").exists(),
                    reason="needs make and the installed llm-influence script of this environment")
def test_make_data_fetches_a_missing_directory_then_verifies_it(server, tmp_path, data_dir):
    """`make demo` depends on `make data`: with no data directory it fetches one (here from the
    local mirror) and verifies it; an existing directory is only verified; a bad one stops make."""
    venv = Path(sys.executable).parent.parent
    stamp = tmp_path / "installed"  # newer than pyproject.toml: make does not reinstall
    stamp.touch()
    env = {k: v for k, v in os.environ.items() if k != "LLM_INFLUENCE_DATA"}
    env[MIRROR_ENV] = server.url
    dest = tmp_path / "data"
    args = ["make", "-s", "-C", str(REPO), "data", f"VENV={venv}", f"DATA={dest}", f"STAMP={stamp}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"no data directory at {dest}; fetching it" in done.stdout
    assert "all 33 data files present and match SHA256SUMS" in done.stdout
    assert files_under(dest) == sorted(f.path for f in DATA_FILES)
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "fetching" not in again.stdout
    broken = dest / DATA_FILES[0].path
    broken.write_bytes(_flip_byte(broken.read_bytes(), 10))
    bad = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and DATA_FILES[0].path in bad.stderr
