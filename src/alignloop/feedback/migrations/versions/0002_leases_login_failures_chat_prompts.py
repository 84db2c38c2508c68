"""task leases, login failures, chat prompts

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 11:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('login_failures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_failure_at', sa.DateTime(), nullable=False),
    sa.Column('blocked_until', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('username', 'address')
    )
    # Rounds made before leases existed get the default lease; open assignments of that time get none
    # (NULL: never expires), since nobody was told about a lease when they took the task.
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_minutes', sa.Integer(), nullable=False, server_default='30'))
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('messages', sa.JSON(), nullable=True))
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.drop_column('lease_expires_at')
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.drop_column('messages')
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.drop_column('lease_minutes')
    op.drop_table('login_failures')
