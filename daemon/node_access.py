"""Which certificate roles may do what on a daemon's TCP port (enforced only under mutual TLS).

Peer links: the role a handshake claims must be the certificate's, so a host cannot pose as a
storage center (centers are asked first and trusted to hold only their share). The publisher
seeds the centers it feeds under an operator certificate while its handshake says storage, so
only a center's outgoing links accept an operator. RPC on the port: only an operator (the
publisher) may make a center pull chunks (`replicate`), and only the tracker may launch,
list or change VMs on a host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from ..swarm.messages import Role
from .pki import TlsRole

# The handshake role each certificate role may claim on a peer link.
LINK_ROLES: Mapping[TlsRole, Role] = MappingProxyType(
    {TlsRole.HOST: Role.HOST, TlsRole.STORAGE: Role.STORAGE, TlsRole.OPERATOR: Role.STORAGE}
)
# Who may open a peer link to a daemon (nobody dials with an operator or tracker certificate).
INBOUND_LINK_ROLES = frozenset({TlsRole.HOST, TlsRole.STORAGE})
# Who may call the RPC methods a daemon serves on its TCP port, by the daemon's role.
_RPC_ROLES: Mapping[Role, frozenset[TlsRole]] = MappingProxyType(
    {Role.STORAGE: frozenset({TlsRole.OPERATOR}), Role.HOST: frozenset({TlsRole.TRACKER})}
)


def dial_roles(local: Role) -> frozenset[TlsRole]:
    """The certificate roles a daemon of role `local` accepts on the links it opens."""
    if local is Role.STORAGE:
        return frozenset({TlsRole.HOST, TlsRole.STORAGE, TlsRole.OPERATOR})
    return INBOUND_LINK_ROLES


def link_refusal(certificate: TlsRole, claimed: Role) -> str | None:
    """Why a link whose certificate has role `certificate` may not claim `claimed`; None if ok."""
    if LINK_ROLES.get(certificate) is claimed:
        return None
    return f"a {certificate.value} certificate may not link as a {claimed.value}"


def rpc_table(local: Role, methods: Iterable[str]) -> dict[str, frozenset[TlsRole]]:
    """For tracker_access.guarded: every one of `methods` open only to its callers' roles."""
    allowed = _RPC_ROLES.get(local, frozenset())
    return {method: allowed for method in methods}


__all__ = ["INBOUND_LINK_ROLES", "LINK_ROLES", "dial_roles", "link_refusal", "rpc_table"]
