"""The fluid lower bound T_min = max(F/u_s, F/d_min, N·F/(u_s + Σu_i)) used by bench.cluster."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.cluster.fluid import TCP_PAYLOAD_FRACTION, payload_rate, t_min, t_min_uniform

MIB = 1 << 20


def test_each_term_can_be_the_bound() -> None:
    # A slow server: F/u_s dominates.
    assert t_min(100, 1, [100, 100], [100, 100]) == 100
    # A slow host download: F/d_min dominates.
    assert t_min(100, 1000, [1000, 2], [1000, 1000]) == 50
    # Many hosts that upload little: the total upload capacity dominates.
    assert t_min(100, 10, [1000] * 10, [0] * 10) == 100


def test_issue_figure_three_centers_at_95_5_mbit() -> None:
    # The issue's setup: 256 MiB, 3 seeds, every link 95.5 Mbit/s effective → 22.5 s for every N.
    rate = 95.5e6 / 8
    for hosts in (1, 2, 3, 4, 6, 8, 12):
        assert t_min_uniform(256 * MIB, hosts, 3, rate) == pytest.approx(22.49, abs=0.01)


def test_peers_off_grows_linearly_once_the_servers_are_saturated() -> None:
    rate = 10.0
    assert t_min_uniform(100, 1, 1, rate, peers=False) == 10
    assert t_min_uniform(100, 12, 1, rate, peers=False) == 120
    assert t_min_uniform(100, 12, 3, rate, peers=False) == 40
    assert t_min_uniform(100, 3, 3, rate, peers=False) == 10


def test_payload_rate_matches_the_measured_htb_rate() -> None:
    # ENVIRONMENT.md: 100 Mbit/s htb measured 95.5 Mbit/s of TCP payload.
    assert payload_rate(100e6) * 8 / 1e6 == pytest.approx(95.6, abs=0.2)
    assert 0.9 < TCP_PAYLOAD_FRACTION < 1


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one host"):
        t_min(1, 1, [], [])
    with pytest.raises(ValueError, match="upload rates"):
        t_min(1, 1, [1, 1], [1])
    with pytest.raises(ValueError, match="must be > 0"):
        t_min(1, 0, [1], [1])


@settings(max_examples=200)
@given(
    size=st.floats(min_value=1, max_value=1e12),
    server=st.floats(min_value=1e3, max_value=1e10),
    hosts=st.lists(
        st.tuples(st.floats(min_value=1e3, max_value=1e10), st.floats(min_value=0, max_value=1e10)),
        min_size=1,
        max_size=20,
    ),
)
def test_bound_is_at_least_each_term_and_equals_one(
    size: float, server: float, hosts: list[tuple[float, float]]
) -> None:
    downloads = [d for d, _ in hosts]
    uploads = [u for _, u in hosts]
    bound = t_min(size, server, downloads, uploads)
    terms = [
        size / server,
        size / min(downloads),
        len(hosts) * size / (server + sum(uploads)),
    ]
    assert all(bound >= term for term in terms)
    assert bound in terms
    # More upload capacity anywhere never makes the bound larger.
    assert t_min(size, server * 2, downloads, uploads) <= bound
    assert t_min(size, server, downloads, [u * 2 for u in uploads]) <= bound
