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


def test_coding_slower_than_the_link_never_beats_raw():
    from kvtransfer.codec import CodingRates, coding_rates
    # a 1 Gb/s link: CPU coding (~10 MB/s) is far slower than sending raw, so raw wins even
    # when nothing fits the budget; GPU coding (tens of GB/s) leaves the link as the bottleneck
    link = 1e9 / 8
    for budget in (0.01, 0.5, 10.0):
        assert choose_level(64 * MB, link, budget, rates=coding_rates("cpu")) == "raw"
    assert choose_level(64 * MB, link, 0.2, rates=coding_rates("cuda")) == "default"
    assert coding_rates("cuda") != coding_rates("cpu") and coding_rates("mps") == coding_rates("cpu")
    # a level is skipped when its own coding alone blows the budget; explicit rates override
    slow = CodingRates({"lossless": 1e8}, {})
    assert choose_level(64 * MB, 200e6, 0.3, rates=slow, levels=("raw", "lossless", "int8")) == "int8"
    assert choose_level(64 * MB, 200e6, 0.3, rates=slow, encode_bytes_per_s={"lossless": 1e12},
                        levels=("raw", "lossless", "int8")) == "lossless"


def test_per_layer_coding_latency_keeps_small_requests_raw():
    from kvtransfer.codec import CodingRates
    fast = CodingRates({"default": 1e12}, {"default": 1e12}, {"default": 2e-3})
    # 32 layers x 2 ms of coding latency: a 4 MB request on a 1 GB/s link is faster raw ...
    assert choose_level(4 * MB, 1e9, 0.01, rates=fast, num_layers=32, levels=("raw", "default")) == "raw"
    # ... a 512 MB one is not
    assert choose_level(512 * MB, 1e9, 0.01, rates=fast, num_layers=32, levels=("raw", "default")) == "default"
