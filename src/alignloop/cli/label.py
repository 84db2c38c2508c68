"""``alignloop label``: the labelling web app (rank, rate, review, side-by-side, admin)."""

from __future__ import annotations

import argparse
import sys

from alignloop.cli.common import add_db_flag, examples_epilog


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the web stack: only once the command runs

    from alignloop.feedback.web.app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.secure_cookies:
        print("alignloop label: warning: listening beyond loopback without --secure-cookies; serve it "
              "behind HTTPS and pass --secure-cookies", file=sys.stderr)
    app = create_app(args.db, secure_cookies=args.secure_cookies)
    print(f"alignloop label: serving {args.db} on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "label", help="run the labelling web app (rank, rate, review, side-by-side, admin)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog(
            "alignloop feedback create-user --username alice --role admin   # first admin",
            "alignloop label --db feedback.db --port 8000",
            "alignloop label --db postgresql://feedback@db/feedback --host 0.0.0.0 --secure-cookies"))
    add_db_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (serve behind HTTPS)")
    p.set_defaults(func=run)
