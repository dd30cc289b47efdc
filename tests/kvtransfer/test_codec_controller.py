"""Per-chunk level choice."""

import pytest

from kvtransfer.codec import choose_level, get_level

MB = 1 << 20


def test_raw_when_the_link_keeps_up():
    assert choose_level(64 * MB, link_bytes_per_s=10e9, time_budget_s=0.1) == "raw"


def test_best_level_that_fits_as_the_link_slows():
    order = ["raw", "lossless", "int8", "default", "aggressive"]
    for name in order:
        # a link just fast enough for this level's expected size, too slow for the one before
        need = 64 * MB * get_level(name).expected_bits / 16 / 0.1
        assert choose_level(64 * MB, link_bytes_per_s=need * 1.01, time_budget_s=0.1) == name


def test_smallest_when_nothing_fits_and_measured_bits_override():
    assert choose_level(64 * MB, link_bytes_per_s=1e6, time_budget_s=0.01) == "aggressive"
    # measured sizes replace the registry's estimates
    assert choose_level(64 * MB, 200e6, 0.1, bits_per_element={"int8": 2.0}) == "int8"
    # coding time counts against the budget
    assert choose_level(64 * MB, 200e6, 0.1, encode_bytes_per_s={"default": 1e9}) != "default"
    with pytest.raises(ValueError):
        choose_level(1, 0, 1)
