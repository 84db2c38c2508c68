"""Commands of the human-feedback platform: ``collect``, ``label`` (the web app) and ``feedback``
(``export``, ``create-user``, ``invite``, ``create-round``, ``add-items``)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from alignloop.config import SamplingConfig, sampling_from_flags
from alignloop.errors import UserError

DEFAULT_DB = "feedback.db"


def _examples(*lines: str) -> str:
    from alignloop.cli import examples_epilog

    return examples_epilog(*lines)


def _db_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("ALIGNLOOP_DB", DEFAULT_DB),
                   help="SQLite file path or database URL (postgresql://user@host/db); "
                        f"default $ALIGNLOOP_DB or {DEFAULT_DB}")


# ---------------------------------------------------------------- collect


def _cmd_collect(args: argparse.Namespace) -> int:
    from alignloop.feedback.collect import collect

    sampling = sampling_from_flags(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size)
    n = collect(args.model, args.prompts, args.db, args.round, k=args.k, sampling=sampling, overlap=args.overlap,
                model_label=args.model_label)
    print(f"collected {args.k} candidates for each of {n} prompts into round {args.round!r} ({args.db})")
    return 0


def _add_collect(sub) -> None:
    p = sub.add_parser(
        "collect", help="generate K candidate responses per prompt into a feedback round",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample K candidates per prompt with the sampling defaults every stage shares (PPO's "
                    "rollouts too): temperature 1, top-k and top-p off, 64 new tokens, stop at EOS. "
                    "Runs on the GPU when there is one.",
        epilog=_examples("alignloop collect --model runs/sft/model --prompts prompts.jsonl --k 4 --round r1",
                         "alignloop collect --model smollm2-135m-instruct --prompts prompts.jsonl --round r1 "
                         "--db postgresql://feedback@db/feedback --temperature 0.8"))
    p.add_argument("--model", required=True, help="model folder, hub id, .gguf or short name")
    p.add_argument("--prompts", required=True, help="JSONL/CSV/parquet with 'prompt' or 'messages' per record")
    p.add_argument("--round", required=True, help="round to add to (created with default criteria if new)")
    p.add_argument("--k", type=int, default=4, help="candidates per prompt (default 4)")
    _db_flag(p)
    defaults = SamplingConfig()
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="(default %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus mass; 1 = off (default %(default)s)")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call, each with its K "
                   "samples (default %(default)s)")
    p.add_argument("--overlap", type=int, default=1, help="people per item when the round is created here")
    p.add_argument("--model-label", help="name stored with each candidate (default: --model)")
    p.set_defaults(func=_cmd_collect)


# ---------------------------------------------------------------- label (web app)


def _cmd_label(args: argparse.Namespace) -> int:
    import uvicorn

    from alignloop.feedback.app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.secure_cookies:
        print("alignloop label: warning: listening beyond loopback without --secure-cookies; serve it "
              "behind HTTPS and pass --secure-cookies", file=sys.stderr)
    app = create_app(args.db, secure_cookies=args.secure_cookies)
    print(f"alignloop label: serving {args.db} on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


def _add_label(sub) -> None:
    p = sub.add_parser(
        "label", help="run the labelling web app (rank, rate, review, side-by-side, admin)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples("alignloop feedback create-user --username alice --role admin   # first admin",
                         "alignloop label --db feedback.db --port 8000",
                         "alignloop label --db postgresql://feedback@db/feedback --host 0.0.0.0 --secure-cookies"))
    _db_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (serve behind HTTPS)")
    p.set_defaults(func=_cmd_label)


# ---------------------------------------------------------------- feedback admin helpers


def _cmd_export(args: argparse.Namespace) -> int:
    from alignloop.feedback.export import export_round

    n = export_round(args.db, args.round, args.output, args.format, args.include_unsafe, args.per_annotator)
    print(f"wrote {n} {args.format} records to {args.output}")
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_env:
        value = os.environ.get(args.password_env)
        if not value:
            raise UserError(f"--password-env: environment variable {args.password_env} is not set")
        return value
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise UserError("the two passwords differ")
    return first


def _session(db: str):
    from alignloop.feedback.db import open_db

    return open_db(db)()


def _cmd_create_user(args: argparse.Namespace) -> int:
    from alignloop.feedback import auth

    with _session(args.db) as db:
        auth.create_user(db, args.username, args.role, _read_password(args))
        db.commit()
    print(f"created {args.role} {args.username}")
    return 0


def _cmd_invite(args: argparse.Namespace) -> int:
    from alignloop.feedback import auth

    with _session(args.db) as db:
        user = auth.create_user(db, args.username, args.role)
        token = auth.issue_token(db, user, "invite")
        db.commit()
    print(f"{args.base_url.rstrip('/')}/invite/{token}")
    return 0


def _cmd_create_round(args: argparse.Namespace) -> int:
    from alignloop.feedback import tasks
    from alignloop.feedback.db import DEFAULT_CRITERIA

    criteria = [dict(c) for c in DEFAULT_CRITERIA]
    if args.criteria:
        try:
            criteria = json.loads(open(args.criteria).read())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"--criteria {args.criteria}: {exc}") from None
    with _session(args.db) as db:
        try:
            tasks.create_round(db, args.name, criteria, args.guidelines or "", args.overlap)
        except tasks.Invalid as exc:
            raise UserError(str(exc)) from None
    print(f"created round {args.name!r} (overlap {args.overlap})")
    return 0


def _cmd_add_items(args: argparse.Namespace) -> int:
    from alignloop.data.io import read_records
    from alignloop.feedback import tasks

    items = [r.data for r in read_records(args.items)]
    with _session(args.db) as db:
        try:
            n = tasks.add_items(db, tasks.get_round(db, args.round), items, args.kind)
        except (tasks.Invalid, tasks.NotFound) as exc:
            raise UserError(f"{args.items}: {exc}") from None
    print(f"added {n} {'policy samples' if args.kind == 'policy' else 'items'} to round {args.round!r}")
    return 0


def _add_feedback(sub) -> None:
    p = sub.add_parser("feedback", help="feedback database: export, users, invites, rounds",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_examples("alignloop feedback export --round r1 --output rm.jsonl",
                                        "alignloop feedback create-user --username alice --role admin"))
    fsub = p.add_subparsers(dest="feedback_command", metavar="SUBCOMMAND", required=True)

    e = fsub.add_parser("export", help="labels of a round in the reward-model formats",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Overlapping labels are aggregated: rankings by mean position (Borda), pairs "
                                    "by majority, ratings by mean. Skipped tasks and candidates flagged unsafe "
                                    "are left out. Approved policy samples are written above flagged ones.",
                        epilog=_examples("alignloop feedback export --db feedback.db --round r1 --output r1.jsonl",
                                         "alignloop feedback export --round r1 --format pairs --output pairs.jsonl",
                                         "alignloop rm --data r1.jsonl ...   # train the reward model on it"))
    _db_flag(e)
    e.add_argument("--round", required=True)
    e.add_argument("--output", required=True, help="JSONL file to write")
    e.add_argument("--format", default="rankings", choices=["rankings", "pairs", "ratings"])
    e.add_argument("--include-unsafe", action="store_true", help="keep candidates flagged unsafe")
    e.add_argument("--per-annotator", action="store_true",
                   help="one record per label with an 'annotator' field instead of aggregating")
    e.set_defaults(func=_cmd_export)

    u = fsub.add_parser("create-user", help="create a user with a password (e.g. the first admin)",
                        epilog="the password is read from --password-env, else one line of stdin, else a prompt")
    _db_flag(u)
    u.add_argument("--username", required=True)
    u.add_argument("--role", default="annotator", choices=["annotator", "reviewer", "admin"])
    u.add_argument("--password-env", help="name of an environment variable holding the password")
    u.set_defaults(func=_cmd_create_user)

    i = fsub.add_parser("invite", help="create a user and print a one-time invite link")
    _db_flag(i)
    i.add_argument("--username", required=True)
    i.add_argument("--role", default="annotator", choices=["annotator", "reviewer", "admin"])
    i.add_argument("--base-url", default="http://127.0.0.1:8000", help="where the app is reachable")
    i.set_defaults(func=_cmd_invite)

    r = fsub.add_parser("create-round", help="create a round (criteria, guidelines, overlap)")
    _db_flag(r)
    r.add_argument("--name", required=True)
    r.add_argument("--overlap", type=int, default=1, help="people per item (2+ lets agreement be measured)")
    r.add_argument("--criteria", help='JSON file: [{"name", "min", "max", "guideline"}, ...]')
    r.add_argument("--guidelines", help="written guidelines shown next to every task")
    r.set_defaults(func=_cmd_create_round)

    a = fsub.add_parser("add-items", help="add prompts with responses (or policy samples) to a round")
    _db_flag(a)
    a.add_argument("--round", required=True)
    a.add_argument("--items", required=True, help='JSONL: {"prompt", "responses": [...], "gold_ranking"?}')
    a.add_argument("--kind", default="candidate", choices=["candidate", "policy"],
                   help="policy = PPO samples for the review queue")
    a.set_defaults(func=_cmd_add_items)


def add_command(subparsers) -> None:
    _add_collect(subparsers)
    _add_label(subparsers)
    _add_feedback(subparsers)
