"""The only exceptions that leave the sans-IO core."""


class ProtocolError(Exception):
    """Base of the errors `swarm/` raises for protocol misuse by either side."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order; drop the connection."""


class ManifestError(ValueError):
    """A manifest or image cannot be accepted; the message says why."""
