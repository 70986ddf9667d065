"""The ``data`` subcommand: ``data fetch`` builds a data directory on a fresh machine from
the pinned upstream sources, ``data verify`` checks one against the shipped SHA-256 sums.

Thin, like the rest of the CLI: it parses arguments and calls :mod:`.fetch`. Problems the
user can fix (a bad mirror URL, a failed download, a file that does not match) are
:class:`~llm_influence.errors.UserError`: one line, exit status 2.
"""

from __future__ import annotations

import argparse

from ..errors import UserError
from .fetch import DATA_FILES, DEFAULT_BASE_URL, MIRROR_ENV, SUMS_FILE, fetch, verify
from .tasks import DATA_ENV, resolve_data_dir


def add_data_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``data fetch`` and ``data verify`` to ``subparsers``; returns the ``data`` parser."""
    p = subparsers.add_parser(
        "data", help="download the paper's data files (data fetch) or check a data directory (data verify)",
        description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{fetch,verify}")

    f = sub.add_parser(
        "fetch", help=f"download, convert and verify the {len(DATA_FILES)} data files into a directory",
        description="Download every data file from its upstream GitHub repository at a pinned commit, "
                    f"convert it, check it against {SUMS_FILE} and put it in place. Files already present "
                    "and verified are skipped; an interrupted download resumes on the next run.")
    f.add_argument("--to", required=True, metavar="DIR",
                   help="data directory to fill (created if missing)")
    f.add_argument("--mirror", metavar="URL",
                   help="base URL laid out as URL/OWNER/REPO/COMMIT/PATH (http, https or file); "
                        f"default: ${MIRROR_ENV}, else {DEFAULT_BASE_URL}")
    f.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    f.set_defaults(func=cmd_data_fetch)

    v = sub.add_parser(
        "verify", help=f"check that every data file is present and matches {SUMS_FILE}",
        description=f"Check every data file against the {SUMS_FILE} shipped with llm-influence; exit "
                    "status 2 naming the first missing or different file.")
    v.add_argument("--data-dir", metavar="DIR", help=f"data directory to check (default: ${DATA_ENV})")
    v.set_defaults(func=cmd_data_verify)
    return p


def cmd_data_fetch(ns: argparse.Namespace) -> int:
    result = fetch(ns.to, ns.mirror, quiet=getattr(ns, "quiet", False))
    directory = result.directory.resolve()
    print(f"data: {directory}: {len(DATA_FILES)} files verified ({len(result.downloaded)} downloaded, "
          f"{len(result.copied)} copied from the package, {len(result.skipped)} already present, skipped); "
          f"use it with {DATA_ENV}={directory} (or --data-dir {directory})", flush=True)
    return 0


def cmd_data_verify(ns: argparse.Namespace) -> int:
    directory = resolve_data_dir(getattr(ns, "data_dir", None))
    problems = verify(directory)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}")
    print(f"data: {directory}: all {len(DATA_FILES)} data files present and match {SUMS_FILE}", flush=True)
    return 0
