"""Which certificate roles may call which tracker RPC method (enforced only under mutual TLS).

`guarded` also takes another table: daemon/node_access.py has the daemons' own.

Announcing makes a node a source, so only hosts and storage centers announce, each only under
its own role. Registering a template is publishing: operators, and storage centers that
re-register what they hold after the tracker lost its state (daemon/node.py _register_held).
Placing a VM is an operator's act. Prefetch profiles are recorded by hosts, the ones that boot
VMs. Reads are open to every authenticated member.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .pki import TlsRole
from .rpc import Handler, Notifier, RpcError

_EVERYONE = frozenset(TlsRole)
METHOD_ROLES: Mapping[str, frozenset[TlsRole]] = MappingProxyType(
    {
        "announce": frozenset({TlsRole.HOST, TlsRole.STORAGE}),
        "register_template": frozenset({TlsRole.OPERATOR, TlsRole.STORAGE}),
        "launch": frozenset({TlsRole.OPERATOR}),
        "put_profile": frozenset({TlsRole.HOST}),
        "get_peers": _EVERYONE,
        "list_templates": _EVERYONE,
        "lookup": _EVERYONE,
        "centers": _EVERYONE,
        "swarm": _EVERYONE,
        "vms": _EVERYONE,
        "flavors": _EVERYONE,
    }
)


def check(
    method: str,
    role: TlsRole,
    params: Mapping[str, Any],
    table: Mapping[str, frozenset[TlsRole]] = METHOD_ROLES,
) -> None:
    """RpcError("forbidden") unless a `role` certificate may make this call (by `table`)."""
    allowed = table.get(method, frozenset())
    if role not in allowed:
        raise RpcError("forbidden", f"{role.value} certificates may not call {method}")
    # A host must not pose as a storage center (or back): centers rank first in the handout.
    claimed = params.get("role")
    if method == "announce" and claimed != role.value:
        raise RpcError(
            "forbidden", f"{role.value} certificates may not announce as role {claimed!r}"
        )


def guarded(
    handlers: Mapping[str, Handler],
    role: TlsRole,
    table: Mapping[str, frozenset[TlsRole]] = METHOD_ROLES,
) -> dict[str, Handler]:
    """`handlers`, each checking first that `role` may call it (by `table`)."""

    def wrap(method: str, handler: Handler) -> Handler:
        async def checked(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            check(method, role, params, table)
            return await handler(params, notifier)

        return checked

    return {method: wrap(method, handler) for method, handler in handlers.items()}
