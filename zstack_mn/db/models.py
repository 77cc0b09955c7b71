"""Table definitions (SQLAlchemy 2). The schema itself is created only by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Table, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UUID_LEN = 36


class Base(DeclarativeBase):
    pass


class ManagementNode(Base):
    """A live (or not yet evicted) management node. Heartbeat is in database time."""

    __tablename__ = "management_node"

    uuid: Mapped[str] = mapped_column(String(UUID_LEN), primary_key=True)
    host_name: Mapped[str] = mapped_column(String(255))
    http_address: Mapped[str] = mapped_column(String(255), default="")
    state: Mapped[str] = mapped_column(String(16))
    liveness_key: Mapped[int] = mapped_column(BigInteger)
    ring_digest: Mapped[str] = mapped_column(String(16), default="")
    join_date: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Host(Base):
    """A hypervisor host, reached through its agent."""

    __tablename__ = "host"
    __table_args__ = (
        Index("ix_host_name_uuid", "name", "uuid"),
        Index("ix_host_state_uuid", "state", "uuid"),
        Index("ix_host_status_uuid", "status", "uuid"),
    )

    uuid: Mapped[str] = mapped_column(String(UUID_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    agent_url: Mapped[str] = mapped_column(String(1024))
    state: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    cpu_total: Mapped[int] = mapped_column(Integer)
    cpu_available: Mapped[int] = mapped_column(Integer)
    memory_total: Mapped[int] = mapped_column(BigInteger)
    memory_available: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class VmInstance(Base):
    """A VM. ``version`` makes every state change compare-and-set; ``op_id`` is the message that
    started the current (or last) operation, so a redelivered message resumes rather than repeats."""

    __tablename__ = "vm_instance"
    __table_args__ = (
        Index("ix_vm_instance_name_uuid", "name", "uuid"),
        Index("ix_vm_instance_state_uuid", "state", "uuid"),
        Index("ix_vm_instance_host_uuid_uuid", "host_uuid", "uuid"),
        Index("ix_vm_instance_host_uuid_state_uuid", "host_uuid", "state", "uuid"),
        Index("ix_vm_instance_created_at_uuid", "created_at", "uuid"),
    )

    uuid: Mapped[str] = mapped_column(String(UUID_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    host_uuid: Mapped[str | None] = mapped_column(String(UUID_LEN), nullable=True)
    last_host_uuid: Mapped[str | None] = mapped_column(String(UUID_LEN), nullable=True)
    target_host_uuid: Mapped[str | None] = mapped_column(String(UUID_LEN), nullable=True)
    cpu_num: Mapped[int] = mapped_column(Integer)
    memory_size: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=1)
    op_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    op_node: Mapped[str | None] = mapped_column(String(UUID_LEN), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MessageResult(Base):
    """The reply to an idempotent request, by request id: a retry gets it back instead of a redo."""

    __tablename__ = "message_result"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    reply: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)


def table_of(model: type[Base]) -> Table:
    """The Core table of a mapped class (typed as a ``Table``, which ``__table__`` is not)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


NODE_TABLE = table_of(ManagementNode)
HOST_TABLE = table_of(Host)
VM_TABLE = table_of(VmInstance)
RESULT_TABLE = table_of(MessageResult)
