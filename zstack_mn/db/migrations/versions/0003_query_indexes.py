"""query indexes: every field the plain API filters on, each ending in uuid

The API pages in uuid order (``after`` continues from a uuid), so an index of (filter, uuid)
answers a filtered page, first or deep, by reading just the rows it returns. ``host_uuid`` with
``state`` is the console's commonest pair (and the host tracker's), and ``created_at`` is the
ZStack API's default sort. The single-column indexes on ``state`` and ``host_uuid`` are replaced
by their (…, uuid) forms, which serve every query they served. Columns that change on most writes
(``updated_at``) and sizes are left unindexed: each index costs every VM state change a write.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_vm_instance_name_uuid": ("vm_instance", ["name", "uuid"]),
    "ix_vm_instance_state_uuid": ("vm_instance", ["state", "uuid"]),
    "ix_vm_instance_host_uuid_uuid": ("vm_instance", ["host_uuid", "uuid"]),
    "ix_vm_instance_host_uuid_state_uuid": ("vm_instance", ["host_uuid", "state", "uuid"]),
    "ix_vm_instance_created_at_uuid": ("vm_instance", ["created_at", "uuid"]),
    "ix_host_name_uuid": ("host", ["name", "uuid"]),
    "ix_host_state_uuid": ("host", ["state", "uuid"]),
    "ix_host_status_uuid": ("host", ["status", "uuid"]),
}
REPLACED = {"ix_vm_instance_state": ["state"], "ix_vm_instance_host_uuid": ["host_uuid"]}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)
    for name in REPLACED:
        op.drop_index(name, table_name="vm_instance")


def downgrade() -> None:
    for name, columns in REPLACED.items():
        op.create_index(name, "vm_instance", columns)
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
