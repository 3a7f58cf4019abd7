"""API keys (issue 7): only the sha256 of each token is stored; idempotency keys unique for owner-less rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:37:14.942846
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('admin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash', name='uq_api_keys_token_hash')
    )
    # UNIQUE(owner, idempotency_key) lets NULL owners repeat a key: close that for the anonymous admin
    for table in ('jobs', 'sweeps'):
        op.create_index(f'uq_{table}_idempotency_key_no_owner', table, ['idempotency_key'], unique=True,
                        sqlite_where=sa.text('owner IS NULL'), postgresql_where=sa.text('owner IS NULL'))


def downgrade() -> None:
    for table in ('jobs', 'sweeps'):
        op.drop_index(f'uq_{table}_idempotency_key_no_owner', table_name=table)
    op.drop_table('api_keys')
