"""VM state changes as server-side functions: one round trip each (PostgreSQL only)

Each function is one statement run in autocommit mode, so a begin, finish or create costs one
round trip and one commit. Inside it: the VM row is locked (or compare-and-set on its version),
capacity is reserved or released on one host, and the op record is checked or written, all in the
statement's transaction. Host choice spreads load: the first fitting host at or after the VM's
uuid in uuid order, skipping hosts another transaction holds, waiting for one only when every
fitting host is held. SQLite (the embedded node) runs the same steps in Python
(``zstack_mn.db.vm_transitions``).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FITS = "h.state = 'Enabled' AND h.status = 'Connected' AND h.cpu_available >= p_cpu AND h.memory_available >= p_memory"

RESERVE_HOST = f"""
CREATE OR REPLACE FUNCTION zstack_reserve_host(
    p_cpu integer, p_memory bigint, p_preferred varchar, p_only varchar, p_exclude varchar, p_pivot varchar
) RETURNS varchar LANGUAGE plpgsql AS $$
DECLARE
    chosen varchar;
BEGIN
    IF p_only IS NOT NULL THEN
        UPDATE host h SET cpu_available = h.cpu_available - p_cpu, memory_available = h.memory_available - p_memory
         WHERE h.uuid = p_only AND {FITS}
        RETURNING h.uuid INTO chosen;
        RETURN chosen;
    END IF;
    IF p_preferred IS NOT NULL AND p_preferred IS DISTINCT FROM p_exclude THEN
        UPDATE host h SET cpu_available = h.cpu_available - p_cpu, memory_available = h.memory_available - p_memory
         WHERE h.uuid = p_preferred AND {FITS}
        RETURNING h.uuid INTO chosen;
        IF chosen IS NOT NULL THEN
            RETURN chosen;
        END IF;
    END IF;
    SELECT h.uuid INTO chosen FROM host h
     WHERE {FITS} AND h.uuid >= p_pivot AND h.uuid IS DISTINCT FROM p_exclude
     ORDER BY h.uuid LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF chosen IS NULL THEN
        SELECT h.uuid INTO chosen FROM host h
         WHERE {FITS} AND h.uuid < p_pivot AND h.uuid IS DISTINCT FROM p_exclude
         ORDER BY h.uuid LIMIT 1 FOR UPDATE SKIP LOCKED;
    END IF;
    IF chosen IS NULL THEN
        SELECT h.uuid INTO chosen FROM host h
         WHERE {FITS} AND h.uuid IS DISTINCT FROM p_exclude
         ORDER BY h.uuid >= p_pivot DESC, h.uuid LIMIT 1 FOR UPDATE;
    END IF;
    IF chosen IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE host h SET cpu_available = h.cpu_available - p_cpu, memory_available = h.memory_available - p_memory
     WHERE h.uuid = chosen;
    RETURN chosen;
END $$;
"""

VM_BEGIN = """
CREATE OR REPLACE FUNCTION zstack_vm_begin(
    p_uuid varchar, p_op_id varchar, p_op_node varchar, p_op_key varchar,
    p_allowed varchar[], p_transient varchar, p_final varchar, p_place varchar, p_only varchar
) RETURNS TABLE (outcome text, vm text, agent_url varchar, recorded text, previous varchar) LANGUAGE plpgsql AS $$
DECLARE
    v vm_instance;
    rec text;
    placed varchar;
    was varchar;
BEGIN
    SELECT * INTO v FROM vm_instance WHERE uuid = p_uuid FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing', NULL::text, NULL::varchar, NULL::text, NULL::varchar;
        RETURN;
    END IF;
    IF v.op_id = p_op_id AND v.state IN (p_transient, p_final) THEN
        RETURN QUERY SELECT CASE WHEN v.state = p_transient THEN 'resume' ELSE 'final' END,
            row_to_json(v)::text, (SELECT h.agent_url FROM host h WHERE h.uuid = v.host_uuid), NULL::text, NULL::varchar;
        RETURN;
    END IF;
    SELECT r.reply INTO rec FROM message_result r WHERE r.id = p_op_key;
    IF FOUND THEN
        RETURN QUERY SELECT 'done', row_to_json(v)::text, NULL::varchar, rec, NULL::varchar;
        RETURN;
    END IF;
    IF NOT (v.state = ANY (p_allowed)) THEN
        RETURN QUERY SELECT 'invalid_state', row_to_json(v)::text, NULL::varchar, NULL::text, NULL::varchar;
        RETURN;
    END IF;
    IF p_place = 'target' THEN
        IF p_only IS NOT NULL AND p_only = v.host_uuid THEN
            RETURN QUERY SELECT 'same_host', row_to_json(v)::text, NULL::varchar, NULL::text, NULL::varchar;
            RETURN;
        END IF;
        placed := zstack_reserve_host(v.cpu_num, v.memory_size, NULL, p_only, v.host_uuid, v.uuid);
    ELSIF p_place = 'host' AND v.host_uuid IS NULL THEN
        placed := zstack_reserve_host(v.cpu_num, v.memory_size, v.last_host_uuid, p_only, NULL, v.uuid);
    ELSE
        p_place := NULL;
    END IF;
    IF p_place IS NOT NULL AND placed IS NULL THEN
        RETURN QUERY SELECT 'no_capacity', row_to_json(v)::text, NULL::varchar, NULL::text, NULL::varchar;
        RETURN;
    END IF;
    was := v.state;
    UPDATE vm_instance SET
        state = p_transient, op_id = p_op_id, op_node = p_op_node,
        host_uuid = CASE WHEN p_place = 'host' THEN placed ELSE host_uuid END,
        target_host_uuid = CASE WHEN p_place = 'target' THEN placed ELSE target_host_uuid END,
        version = version + 1, updated_at = now()
     WHERE uuid = p_uuid RETURNING * INTO v;
    RETURN QUERY SELECT 'ok', row_to_json(v)::text,
        (SELECT h.agent_url FROM host h WHERE h.uuid = v.host_uuid), NULL::text, was;
END $$;
"""

VM_FINISH = """
CREATE OR REPLACE FUNCTION zstack_vm_finish(
    p_uuid varchar, p_version integer, p_state varchar, p_host_uuid varchar, p_last_host_uuid varchar,
    p_target_host_uuid varchar, p_release varchar, p_op_key varchar
) RETURNS TABLE (outcome text, vm text, recorded text) LANGUAGE plpgsql AS $$
DECLARE
    v vm_instance;
    snapshot text;
BEGIN
    UPDATE vm_instance SET
        state = p_state, host_uuid = p_host_uuid, last_host_uuid = p_last_host_uuid,
        target_host_uuid = p_target_host_uuid, version = version + 1, updated_at = now()
     WHERE uuid = p_uuid AND version = p_version RETURNING * INTO v;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'conflict', NULL::text, (SELECT r.reply FROM message_result r WHERE r.id = p_op_key);
        RETURN;
    END IF;
    IF p_release IS NOT NULL THEN
        UPDATE host h SET cpu_available = h.cpu_available + v.cpu_num, memory_available = h.memory_available + v.memory_size
         WHERE h.uuid = p_release;
    END IF;
    snapshot := row_to_json(v)::text;
    INSERT INTO message_result (id, reply, created_at) VALUES (p_op_key, snapshot, now()) ON CONFLICT (id) DO NOTHING;
    RETURN QUERY SELECT 'ok', snapshot, NULL::text;
END $$;
"""

VM_CREATE = """
CREATE OR REPLACE FUNCTION zstack_vm_create(
    p_uuid varchar, p_name varchar, p_cpu integer, p_memory bigint, p_only varchar,
    p_state varchar, p_op_id varchar, p_op_node varchar, p_op_key varchar
) RETURNS TABLE (outcome text, vm text, agent_url varchar, recorded text) LANGUAGE plpgsql AS $$
DECLARE
    v vm_instance;
    placed varchar;
BEGIN
    SELECT * INTO v FROM vm_instance WHERE uuid = p_uuid;
    IF FOUND THEN
        RETURN QUERY SELECT 'exists', row_to_json(v)::text, NULL::varchar,
            (SELECT r.reply FROM message_result r WHERE r.id = p_op_key);
        RETURN;
    END IF;
    placed := zstack_reserve_host(p_cpu, p_memory, NULL, p_only, NULL, p_uuid);
    IF placed IS NULL THEN
        RETURN QUERY SELECT 'no_capacity', NULL::text, NULL::varchar, NULL::text;
        RETURN;
    END IF;
    INSERT INTO vm_instance (uuid, name, state, host_uuid, cpu_num, memory_size, version, op_id, op_node, created_at, updated_at)
    VALUES (p_uuid, p_name, p_state, placed, p_cpu, p_memory, 1, p_op_id, p_op_node, now(), now())
    RETURNING * INTO v;
    RETURN QUERY SELECT 'ok', row_to_json(v)::text, (SELECT h.agent_url FROM host h WHERE h.uuid = placed), NULL::text;
END $$;
"""

FUNCTIONS = ("zstack_vm_create", "zstack_vm_finish", "zstack_vm_begin", "zstack_reserve_host")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for sql in (RESERVE_HOST, VM_BEGIN, VM_FINISH, VM_CREATE):
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {name} CASCADE")
