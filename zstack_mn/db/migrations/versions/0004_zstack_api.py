"""ZStack API compatibility: accounts, sessions and asynchronous API jobs

``zstack_account``: who may log in (the password as a salted PBKDF2 of the SHA-512 hex digest a
ZStack client sends). ``zstack_session``: a login, valid for ``timeout_s`` from ``created_at``
(database time). ``zstack_api_job``: one asynchronous API call (REST ``/zstack/v1/api-jobs/<uuid>``,
RPC ``/zstack/api/result/<uuid>``), kept in the database so that any node can answer a poll and
take over a job whose node is gone.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "zstack_account",
        sa.Column("uuid", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("type", sa.String(32), nullable=False, server_default="SystemAdmin"),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "zstack_session",
        sa.Column("uuid", sa.String(32), primary_key=True),
        sa.Column("account_uuid", sa.String(32), nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_zstack_session_created_at", "zstack_session", ["created_at"])
    op.create_table(
        "zstack_api_job",
        sa.Column("uuid", sa.String(32), primary_key=True),
        sa.Column("api", sa.String(128), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("success", sa.Boolean, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("node", sa.String(36), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
        sa.Column("lease_s", sa.Float, nullable=False),
        sa.Column("lease_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_zstack_api_job_created_at", "zstack_api_job", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_zstack_api_job_created_at", "zstack_api_job")
    op.drop_table("zstack_api_job")
    op.drop_index("ix_zstack_session_created_at", "zstack_session")
    op.drop_table("zstack_session")
    op.drop_table("zstack_account")
