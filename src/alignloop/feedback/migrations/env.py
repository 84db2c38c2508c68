"""Alembic environment: runs on the connection handed over by alignloop.feedback.db.migrate."""

from alembic import context

from alignloop.feedback.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    from alignloop.feedback.db import make_engine

    # `alembic -x db=URL ...` from the command line (used when writing new revisions).
    engine = make_engine(context.get_x_argument(as_dictionary=True).get("db", "feedback.db"))
    connection = engine.connect()

# render_as_batch: SQLite can only ALTER tables by copying them; batch mode does that for us.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
