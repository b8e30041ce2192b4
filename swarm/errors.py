"""The only exceptions that leave the sans-IO core."""


class ProtocolError(Exception):
    """Base of the errors `swarm/` raises for protocol misuse by either side."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order; drop the connection."""


def ends_stream(ended: bool, data: bytes | bytearray | memoryview) -> bool:
    """The sans-IO machines' rule for received data: b"" ends the stream, nothing may follow.

    True when the stream is (now) over and `data` is to be ignored; data after the end is a bug.
    """
    if ended and data:
        raise LocalProtocolError("received data after end of stream")
    return ended or not data


class ManifestError(ValueError):
    """A manifest or image cannot be accepted; the message says why."""
