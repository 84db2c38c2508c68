"""``alignloop feedback``: the feedback database from the command line (``export``, ``create-user``,
``invite``, ``create-round``, ``add-items``)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from alignloop.cli.common import add_db_flag, examples_epilog
from alignloop.errors import UserError

# feedback.db.ROLES, spelled out here so that --help does not load the database layer.
ROLES = ["annotator", "reviewer", "admin"]


def export(args: argparse.Namespace) -> int:
    from alignloop.feedback.export import export_round  # the database layer: only once the command runs

    n = export_round(args.db, args.round, args.output, args.format, args.include_unsafe, args.per_annotator)
    print(f"wrote {n} {args.format} records to {args.output}")
    return 0


def read_password(password_env: str | None) -> str:
    """The new user's password: from an environment variable, else one line of piped stdin, else typed twice."""
    if password_env:
        value = os.environ.get(password_env)
        if not value:
            raise UserError(f"--password-env: environment variable {password_env} is not set")
        return value
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise UserError("the two passwords differ")
    return first


def create_user(args: argparse.Namespace) -> int:
    from alignloop.feedback import admin

    admin.create_user(args.db, args.username, args.role, read_password(args.password_env))
    print(f"created {args.role} {args.username}")
    return 0


def invite(args: argparse.Namespace) -> int:
    from alignloop.feedback import admin

    token = admin.invite(args.db, args.username, args.role)
    print(f"{args.base_url.rstrip('/')}/invite/{token}")
    return 0


def create_round(args: argparse.Namespace) -> int:
    from alignloop.feedback import admin

    criteria = None
    if args.criteria:
        try:
            criteria = json.loads(Path(args.criteria).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"--criteria {args.criteria}: {exc}") from None
    admin.create_round(args.db, args.name, criteria, args.guidelines or "", args.overlap, args.lease_minutes)
    print(f"created round {args.name!r} (overlap {args.overlap}, lease {args.lease_minutes} minutes)")
    return 0


def add_items(args: argparse.Namespace) -> int:
    from alignloop.feedback import admin

    n = admin.add_items(args.db, args.round, args.items, args.kind)
    print(f"added {n} {'policy samples' if args.kind == 'policy' else 'items'} to round {args.round!r}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("feedback", help="feedback database: export, users, invites, rounds",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=examples_epilog("alignloop feedback export --round r1 --output rm.jsonl",
                                              "alignloop feedback create-user --username alice --role admin"))
    fsub = p.add_subparsers(dest="feedback_command", metavar="SUBCOMMAND", required=True)

    e = fsub.add_parser("export", help="labels of a round in the reward-model formats",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Overlapping labels are aggregated: rankings by mean position (Borda), pairs "
                                    "by majority, ratings by mean. Skipped tasks and candidates flagged unsafe "
                                    "are left out. Approved policy samples are written above flagged ones.",
                        epilog=examples_epilog(
                            "alignloop feedback export --db feedback.db --round r1 --output r1.jsonl",
                            "alignloop feedback export --round r1 --format pairs --output pairs.jsonl",
                            "alignloop rm --data r1.jsonl ...   # train the reward model on it",
                            "alignloop feedback export --round r1 --format unpaired --output kto.jsonl",
                            "alignloop dpo --data kto.jsonl dpo.loss=kto ..."))
    add_db_flag(e)
    e.add_argument("--round", required=True)
    e.add_argument("--output", required=True, help="JSONL file to write")
    e.add_argument("--format", default="rankings", choices=["rankings", "pairs", "ratings", "unpaired"],
                   help="unpaired: desirable / undesirable examples for KTO (alignloop dpo, dpo.loss=kto)")
    e.add_argument("--include-unsafe", action="store_true", help="keep candidates flagged unsafe")
    e.add_argument("--per-annotator", action="store_true",
                   help="one record per label with an 'annotator' field instead of aggregating")
    e.set_defaults(func=export)

    u = fsub.add_parser("create-user", help="create a user with a password (e.g. the first admin)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="the password is read from --password-env, else one line of stdin, else a prompt\n\n"
                               + examples_epilog(
                                   "alignloop feedback create-user --username alice --role admin",
                                   "ADMIN_PW=... alignloop feedback create-user --username root --role admin "
                                   "--password-env ADMIN_PW"))
    add_db_flag(u)
    u.add_argument("--username", required=True)
    u.add_argument("--role", default="annotator", choices=ROLES)
    u.add_argument("--password-env", help="name of an environment variable holding the password")
    u.set_defaults(func=create_user)

    i = fsub.add_parser("invite", help="create a user and print a one-time invite link",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=examples_epilog(
                            "alignloop feedback invite --username bob --role reviewer "
                            "--base-url https://label.example.org"))
    add_db_flag(i)
    i.add_argument("--username", required=True)
    i.add_argument("--role", default="annotator", choices=ROLES)
    i.add_argument("--base-url", default="http://127.0.0.1:8000", help="where the app is reachable")
    i.set_defaults(func=invite)

    r = fsub.add_parser("create-round", help="create a round (criteria, guidelines, overlap)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=examples_epilog(
                            "alignloop feedback create-round --name r1 --overlap 2",
                            "alignloop feedback create-round --name r2 --criteria criteria.json "
                            "--guidelines 'Prefer short, correct answers.'"))
    add_db_flag(r)
    r.add_argument("--name", required=True)
    r.add_argument("--overlap", type=int, default=1, help="people per item (2+ lets agreement be measured)")
    r.add_argument("--lease-minutes", type=int, default=30,
                   help="how long an annotator holds an item; unlabelled by then, it goes back to the queue "
                        "(default 30)")
    r.add_argument("--criteria", help='JSON file: [{"name", "min", "max", "guideline"}, ...]')
    r.add_argument("--guidelines", help="written guidelines shown next to every task")
    r.set_defaults(func=create_round)

    a = fsub.add_parser("add-items", help="add prompts with responses (or policy samples) to a round",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=examples_epilog(
                            "alignloop feedback add-items --round r1 --items items.jsonl",
                            "alignloop feedback add-items --round r1 --items runs/ppo/samples.jsonl --kind policy"))
    add_db_flag(a)
    a.add_argument("--round", required=True)
    a.add_argument("--items", required=True, help='JSONL: {"prompt", "responses": [...], "gold_ranking"?}')
    a.add_argument("--kind", default="candidate", choices=["candidate", "policy"],
                   help="policy = PPO samples for the review queue")
    a.set_defaults(func=add_items)
