"""initial schema: management_node, host, vm_instance, message_result

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "management_node",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("host_name", sa.String(255), nullable=False),
        sa.Column("http_address", sa.String(255), nullable=False, server_default=""),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("liveness_key", sa.BigInteger, nullable=False),
        sa.Column("ring_digest", sa.String(16), nullable=False, server_default=""),
        sa.Column("join_date", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("heartbeat", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "host",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("agent_url", sa.String(1024), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cpu_total", sa.Integer, nullable=False),
        sa.Column("cpu_available", sa.Integer, nullable=False),
        sa.Column("memory_total", sa.BigInteger, nullable=False),
        sa.Column("memory_available", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("cpu_available >= 0 AND memory_available >= 0", name="ck_host_capacity_nonnegative"),
    )
    op.create_table(
        "vm_instance",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("host_uuid", sa.String(36), nullable=True),
        sa.Column("last_host_uuid", sa.String(36), nullable=True),
        sa.Column("target_host_uuid", sa.String(36), nullable=True),
        sa.Column("cpu_num", sa.Integer, nullable=False),
        sa.Column("memory_size", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("op_id", sa.String(64), nullable=True),
        sa.Column("op_node", sa.String(36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_vm_instance_state", "vm_instance", ["state"])
    op.create_index("ix_vm_instance_host_uuid", "vm_instance", ["host_uuid"])
    op.create_table(
        "message_result",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("reply", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_message_result_created_at", "message_result", ["created_at"])


def downgrade() -> None:
    op.drop_table("message_result")
    op.drop_table("vm_instance")
    op.drop_table("host")
    op.drop_table("management_node")
