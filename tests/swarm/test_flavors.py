"""Flavors: built-ins, parsing from a config table, sizes, and the wire form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.flavors import (
    GIB,
    MIB,
    Flavor,
    FlavorError,
    default_flavors,
    flavor_from_dict,
    flavor_from_wire,
    flavor_list,
    flavors_from_dict,
    format_size,
    parse_size,
)


def test_builtins_are_tiny_small_medium_with_room_to_grow() -> None:
    flavors = default_flavors()
    assert list(flavors) == ["tiny", "small", "medium"]
    for flavor in flavors.values():
        assert flavor.max_vcpus >= flavor.vcpus
        assert flavor.max_memory >= flavor.memory
        assert flavor.disk > 0
    assert flavors["tiny"].memory < flavors["small"].memory < flavors["medium"].memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MIB),
        ("512M", 512 * MIB),
        ("2G", 2 * GIB),
        ("2 GiB", 2 * GIB),
        ("1.5GiB", 3 * GIB // 2),
        ("4096", 4096),
        ("64kb", 64 * 1024),
        (1024, 1024),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "12 parsecs", "-5M", -1, 1.5, None, "1e9"])
def test_parse_size_rejects_nonsense(bad: object) -> None:
    with pytest.raises(FlavorError):
        parse_size(bad, "memory")


@given(st.integers(min_value=0, max_value=1 << 50))
@settings(max_examples=200)
def test_format_size_round_trips(count: int) -> None:
    assert parse_size(format_size(count)) == count


def test_flavor_from_dict_with_sizes_as_text() -> None:
    flavor = flavor_from_dict(
        "big", {"vcpus": 4, "memory": "8GiB", "disk": "100G", "max_memory": "16GiB"}
    )
    assert flavor == Flavor("big", 4, 8 * GIB, 100 * GIB, max_vcpus=4, max_memory=16 * GIB)


def test_maximums_default_to_the_base_values() -> None:
    flavor = flavor_from_dict("flat", {"vcpus": 2, "memory": 256 * MIB, "disk": 0})
    assert (flavor.max_vcpus, flavor.max_memory) == (2, 256 * MIB)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"vcpus": 1, "memory": "1GiB"}, "lacks disk"),
        ({"vcpus": 0, "memory": "1GiB", "disk": 0}, "vcpus must be in"),
        ({"vcpus": "2", "memory": "1GiB", "disk": 0}, "vcpus must be an integer"),
        ({"vcpus": 1, "memory": "1MiB", "disk": 0}, "memory must be at least"),
        ({"vcpus": 2, "memory": "1GiB", "disk": 0, "max_vcpus": 1}, "max_vcpus"),
        ({"vcpus": 1, "memory": "1GiB", "disk": 0, "max_memory": "512MiB"}, "below memory"),
        ({"vcpus": 1, "memory": "1GiB", "disk": 0, "cpus": 3}, "unknown keys"),
        ({"vcpus": 1, "memory": "lots", "disk": 0}, "not a size"),
    ],
)
def test_bad_flavors_say_what_is_wrong(data: dict[str, object], message: str) -> None:
    with pytest.raises(FlavorError, match=message):
        flavor_from_dict("f", data)


def test_bad_names_are_refused() -> None:
    with pytest.raises(FlavorError, match="flavor name"):
        Flavor("no spaces", 1, 64 * MIB, 0)


def test_config_table_replaces_the_builtins() -> None:
    flavors = flavors_from_dict(
        {"flavors": {"one": {"vcpus": 1, "memory": "64MiB", "disk": "1GiB"}}}
    )
    assert list(flavors) == ["one"]
    with pytest.raises(FlavorError, match=r"\[flavors\]"):
        flavors_from_dict({"flavor": {}})
    with pytest.raises(FlavorError, match=r"\[flavors\]"):
        flavors_from_dict({"flavors": {}})


@given(
    vcpus=st.integers(1, 64),
    extra_vcpus=st.integers(0, 64),
    memory=st.integers(16 * MIB, 1 << 40),
    extra_memory=st.integers(0, 1 << 40),
    disk=st.integers(0, 1 << 44),
)
@settings(max_examples=100)
def test_wire_form_round_trips(
    vcpus: int, extra_vcpus: int, memory: int, extra_memory: int, disk: int
) -> None:
    flavor = Flavor("f1", vcpus, memory, disk, vcpus + extra_vcpus, memory + extra_memory)
    assert flavor_from_wire(flavor.as_dict()) == flavor


def test_flavor_list_is_smallest_first() -> None:
    names = [f["name"] for f in flavor_list(default_flavors())]
    assert names == ["tiny", "small", "medium"]
