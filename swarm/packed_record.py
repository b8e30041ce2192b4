"""Small fixed-shape msgpack records (signature envelopes, prefetch profiles), decoded safely."""

from __future__ import annotations

from typing import Any

import msgpack


def unpack_record(raw: bytes, *, fields: int, max_bin: int, what: str) -> list[Any]:
    """A msgpack array of exactly `fields` items, with size limits set before decoding.

    Raises ValueError naming `what` for anything else (bad msgpack, other shape, oversize).
    """
    try:
        record: Any = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            max_str_len=64,
            max_bin_len=max_bin,
            max_array_len=fields,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"{what} is not valid msgpack: {exc}") from None
    if type(record) is not list or len(record) != fields:
        raise ValueError(f"{what} must be a msgpack array of {fields} fields")
    return record
