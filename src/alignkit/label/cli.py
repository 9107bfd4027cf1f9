"""``alignkit label serve | export | stats`` (wired into ``alignkit`` by ``alignkit.cli``).

    alignkit label serve  --data to_label.jsonl --db labels.sqlite [--per-task 2] [--labelers ana,ben]
    alignkit label export --db labels.sqlite --output ranked.jsonl [--rubric-weights w.yaml]
    alignkit label stats  --db labels.sqlite [--json]

Every flag can also come from ``--config FILE.yaml`` (``db: labels.sqlite``, ``per-task: 2``, ...),
checked as the flag would be; flags given on the command line win over the file.

Exit codes as everywhere in alignkit: 0 done, 2 bad input (one line naming file, line and field),
1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import sys
from pathlib import Path

from ..errors import InputError

TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-.~]{8,256}$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are bad input too: exit 2, one line
        raise InputError(message, file="command line")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignkit label", description="Label K responses per prompt in a local web app, "
                                                        "then export K-wise rankings for `alignkit rm`.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    db_help = "the label database: a SQLite file path (created if missing) or a URL such as " \
              "postgresql+psycopg://user@host/db for a shared team server"
    config_help = "YAML file of flag: value (e.g. db: labels.sqlite); flags on the command line win"

    serve = sub.add_parser("serve", help="serve the labeling app; prints a local URL with an access token")
    serve.add_argument("--config", type=Path, help=config_help)
    serve.add_argument("--data", help="rows to label: {prompt, responses: [K]} (JSONL/JSON/Parquet/CSV, "
                                      "what `alignkit generate` writes); optional when the database has tasks")
    serve.add_argument("--db", help=db_help + " (required)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    serve.add_argument("--token", default=None, help="access token (default: $ALIGNKIT_LABEL_TOKEN, else random)")
    serve.add_argument("--per-task", type=_positive, default=1,
                       help="how many labelers label each task (more than 1 measures agreement; default 1)")
    serve.add_argument("--labelers", default=None,
                       help="comma-separated labeler names allowed to log in (default: anyone with the token)")

    export = sub.add_parser("export", help="write K-wise rows (ranks, rubric, labeler, time) for `alignkit rm`")
    export.add_argument("--config", type=Path, help=config_help)
    export.add_argument("--db", help=db_help + " (required)")
    export.add_argument("--output", type=Path, help="JSONL file to write (atomically; required)")
    export.add_argument("--rubric-weights", type=Path, default=None,
                        help="YAML/JSON field -> weight for ranking labels scored without a ranking "
                             "(default: alignkit.rubric.DEFAULT_WEIGHTS)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    stats = sub.add_parser("stats", help="progress, per-labeler counts, agreement and Kendall's tau-b")
    stats.add_argument("--config", type=Path, help=config_help)
    stats.add_argument("--db", help=db_help + " (required)")
    stats.add_argument("--rubric-weights", type=Path, default=None, help="as for export")
    stats.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.subcommands = {"serve": serve, "export": export, "stats": stats}
    return parser


REQUIRED = {"serve": ("db",), "export": ("db", "output"), "stats": ("db",)}


def _config_defaults(sub: argparse.ArgumentParser, path: Path) -> dict:
    """The --config file's values as the subcommand's defaults, each converted and checked as the
    same flag on the command line would be. Unknown fields and bad values: InputError naming the
    file, the line and the field."""
    from ..config import flatten_yaml

    values, lines = flatten_yaml(path)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    out = {}
    for name, value in values.items():
        where = {"file": str(path), "line": lines.get(name), "field": name}
        action = actions.get(name)
        if action is None:
            raise InputError(f"unknown field; this command takes {', '.join(sorted(actions))}", **where)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise InputError(f"must be true or false, got {value!r}", **where)
            out[name] = value
            continue
        if value is None or isinstance(value, (dict, list)):
            raise InputError(f"must be a single value, got {value!r}", **where)
        try:
            out[name] = action.type(str(value)) if action.type else str(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise InputError(str(e) or f"invalid value {value!r}", **where) from None
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    """Command line over --config file over the flags' defaults; the required flags checked last."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        sub = parser.subcommands[args.command]
        sub.set_defaults(**_config_defaults(sub, args.config))
        args = parser.parse_args(argv)
    for name in REQUIRED[args.command]:
        if getattr(args, name) is None:
            raise InputError(f"the following argument is required: --{name} (or {name}: in --config)",
                             file="command line", field=name)
    return args


# ----------------------------------------------------------------------------- serve

def _labeler_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from .app import NAME_RE

    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if not NAME_RE.match(n):
            raise InputError(f"bad labeler name {n!r}: 1-64 letters, digits, spaces or . _ @ -",
                             file="command line", field="labelers")
    if not names:
        raise InputError("no labeler names given", file="command line", field="labelers")
    return names


def _token(given: str | None) -> str:
    token = given or os.environ.get("ALIGNKIT_LABEL_TOKEN") or secrets.token_urlsafe(24)
    if not TOKEN_RE.match(token):
        raise InputError("must be 8-256 characters of letters, digits and - _ . ~", file="command line",
                         field="token")
    return token


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so port 0 is resolved and the printed URL is the real one."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}", file="command line",
                         field="port") from None
    return sock


def _url(host: str, port: int, token: str) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/?token={token}"


def serve(args) -> int:
    import uvicorn

    from .app import create_app
    from .store import Store
    from .tasks import load_tasks

    labelers, token = _labeler_list(args.labelers), _token(args.token)
    new_tasks = load_tasks(args.data) if args.data else None  # every row checked before the DB is touched
    store = Store(args.db)
    added = store.add_tasks(new_tasks) if new_tasks else 0
    total = store.task_count()
    if total == 0:
        raise InputError("the database has no tasks: give --data with rows to label", field="data")
    sock = _bind(args.host, args.port)
    url = _url(args.host, sock.getsockname()[1], token)
    print(f"alignkit label: {total} tasks ({added} new), {args.per_task} labeler(s) per task, database "
          f"{store.display}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"alignkit label: listening on {args.host}: anyone who can reach this machine AND has the token "
              "can label; use HTTPS in front of it on a shared network", flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:  # only now does the URL answer
                print(f"alignkit label: open {url}", flush=True)

    app = create_app(store, token=token, per_task=args.per_task, labelers=labelers)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    try:
        Server(config).run(sockets=[sock])
    finally:
        store.close()
    return 0


# ----------------------------------------------------------------------------- export, stats

def _export(args) -> int:
    from ..rubric import load_weights
    from .export import export
    from .store import Store

    weights = load_weights(args.rubric_weights)
    store = Store(args.db, create=False)
    try:
        written, tied = export(store, args.output, weights, overwrite=args.overwrite)
    finally:
        store.close()
    skipped = f"; {tied} left out: all responses tied, nothing to compare" if tied else ""
    print(f"alignkit label: wrote {written} rows to {args.output}{skipped}")
    return 0


def _stats(args) -> int:
    from ..rubric import load_weights
    from .stats import compute_stats, format_stats
    from .store import Store

    weights = load_weights(args.rubric_weights)
    store = Store(args.db, create=False)
    try:
        result = compute_stats(store, weights)
    finally:
        store.close()
    print(json.dumps(result, indent=2) if args.json else format_stats(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        return {"serve": serve, "export": _export, "stats": _stats}[args.command](args)
    except InputError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
