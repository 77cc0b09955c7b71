"""ZStack's query APIs (``QueryVmInstance``, ``QueryHost``, ``QueryManagementNode``) with
conditions, sort, paging and projection, answered from the database on the node that got them.

The rows are read with the tables and row → inventory functions of ``zstack_mn.db.vms`` and
``zstack_mn.db.hosts`` and the portal's management-node listing, then shaped by
``inventories``; the reply is ZStack's ``APIQueryReply``: ``inventories`` and, with ``count``
or ``replyWithCount``, ``total``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from zstack_mn.db.hosts import HostRow, host_inventory
from zstack_mn.db.models import HOST_TABLE, NODE_TABLE, VM_TABLE
from zstack_mn.db.vms import VmRow, vm_inventory
from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.web.zstack import builtins, inventories
from zstack_mn.web.zstack.catalog import Inventory, ZApi
from zstack_mn.web.zstack.conditions import HOST_FIELDS, MANAGEMENT_NODE_FIELDS, VM_FIELDS, QuerySpec


async def run_query(portal: ApiPortal, api: ZApi, spec: QuerySpec) -> dict[str, Any]:
    if api.inventory is Inventory.IMAGE:
        return builtins.query([builtins.NO_IMAGE], spec)
    if api.inventory is Inventory.L3_NETWORK:
        return builtins.query([builtins.NO_NETWORK], spec)
    db = portal.ctx.db
    if api.inventory is Inventory.MANAGEMENT_NODE:
        where = spec.where(MANAGEMENT_NODE_FIELDS, NODE_TABLE)
        order = spec.order(MANAGEMENT_NODE_FIELDS, NODE_TABLE)
        async with db.begin() as conn:
            total = (await conn.execute(select(func.count()).select_from(NODE_TABLE).where(where))).scalar_one()
            rows = await conn.execute(
                select(NODE_TABLE.c.uuid).where(where).order_by(*order).limit(spec.limit).offset(spec.start)
            )
            wanted = [r.uuid for r in rows]
        nodes = {n.uuid: n for n in await portal.management_nodes()}
        found = [inventories.management_node(nodes[u]) for u in wanted if u in nodes]
        return spec.reply(int(total), found)
    if api.inventory is Inventory.VM:
        table, queryable = VM_TABLE, VM_FIELDS
    else:
        table, queryable = HOST_TABLE, HOST_FIELDS
    where = spec.where(queryable, table)
    order = spec.order(queryable, table)
    async with db.begin() as conn:
        total = (await conn.execute(select(func.count()).select_from(table).where(where))).scalar_one()
        items: list[dict[str, Any]] = []
        if not spec.count and spec.limit > 0:
            rows = await conn.execute(select(table).where(where).order_by(*order).limit(spec.limit).offset(spec.start))
            for r in rows:
                if api.inventory is Inventory.VM:
                    items.append(inventories.vm(vm_inventory(VmRow.of(r._mapping)).to_wire()))
                else:
                    items.append(inventories.host(host_inventory(HostRow.of(r._mapping)).to_wire()))
    return spec.reply(int(total), items)
