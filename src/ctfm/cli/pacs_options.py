"""The PACS options every verb that reads scans takes (``--query``, ``--calling-aet``, credentials,
TLS, the series cache), and the session that makes them current while the verb runs."""

from __future__ import annotations

import contextlib


def add_pacs_arguments(parser) -> None:
    g = parser.add_argument_group(
        "PACS sources (dicomweb:http(s)://HOST[:PORT]/PREFIX[/studies/UID[/series/UID]], dimse://AET@HOST:PORT[/STUDY[/SERIES]])"
    )
    g.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="KEYWORD=VALUE",
        dest="pacs_query",
        help="QIDO / C-FIND filter, repeatable: --query StudyDate=20240101-20241231 (default Modality=CT)",
    )
    g.add_argument("--calling-aet", default="CTFM", help="ctfm's AE title towards a DIMSE PACS (default CTFM)")
    g.add_argument(
        "--retrieve", default="get", choices=["get", "move"], help="DIMSE retrieval: C-GET (default) or C-MOVE"
    )
    g.add_argument(
        "--move-port", type=int, default=0, help="C-MOVE: the port of ctfm's storage SCP (registered at the PACS)"
    )
    g.add_argument("--user", default=None, help="DICOMweb user name (with --password-file)")
    g.add_argument("--password-file", default=None, metavar="FILE", help="file whose first line is the password")
    g.add_argument("--token-file", default=None, metavar="FILE", help="file whose first line is a bearer token")
    g.add_argument("--ca-file", default=None, metavar="PEM", help="CA bundle for https (default: the system's)")
    g.add_argument("--cache-dir", default=None, help="series cache (default ~/.cache/ctfm/pacs or $CTFM_PACS_CACHE)")
    g.add_argument("--cache-gb", type=float, default=20.0, help="series cache bound in GB, least recently used out")
    g.add_argument("--pacs-timeout", type=float, default=30.0, help="seconds per PACS request (default 30)")
    g.add_argument("--pacs-retries", type=int, default=3, help="retries after a dropped connection, 5xx or timeout")


def pacs_options(args):
    from ctfm.io.pacs import PacsOptions, parse_query, read_secret

    password = read_secret(args.password_file, "password") if args.password_file else None
    token = read_secret(args.token_file, "token") if args.token_file else None
    return PacsOptions(
        calling_aet=args.calling_aet,
        query=parse_query(args.pacs_query),
        cache_dir=args.cache_dir,
        cache_gb=args.cache_gb,
        user=args.user,
        password=password,
        token=token,
        ca_file=args.ca_file,
        timeout_s=args.pacs_timeout,
        retries=args.pacs_retries,
        retrieve=args.retrieve,
        move_port=args.move_port,
    )


@contextlib.contextmanager
def pacs_session(args):
    """The verb's PACS options made current (a verb without PACS options runs as it is)."""
    if not hasattr(args, "pacs_query"):
        yield None
        return
    from ctfm.io.pacs import use_options

    with use_options(pacs_options(args)) as options:
        yield options
