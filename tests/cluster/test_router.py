from cluster.router import Router


def make_router(**kw):
    return Router(["p0", "p1"], ["d0", "d1"], block_size=16, max_queued_tokens=1000,
                  num_blocks={"p0": 100, "p1": 100, "d0": 100, "d1": 100}, **kw)


def test_prefill_goes_to_the_least_loaded_and_backpressure_holds():
    r = make_router()
    assert r.pick_prefill(100) == "p0"
    r.dispatched("p0", "d0", 600)
    assert r.pick_prefill(100) == "p1"
    r.dispatched("p1", "d1", 900)
    assert r.pick_prefill(500) is None          # both queues would pass the cap
    r.prefilled("p0", 600)
    assert r.pick_prefill(500) == "p0"


def test_decode_prefers_free_blocks_and_cheap_links_and_skips_dead():
    r = make_router(link_cost={("p0", "d0"): 50.0})
    assert r.pick_decode("p0", 100) == "d1"      # d0's link from p0 is expensive
    assert r.pick_decode("p1", 100) == "d1"      # equal free blocks: tie broken by name (max)
    r.report("d1", free_blocks=10, num_blocks=100)
    assert r.pick_decode("p1", 100) == "d0"
    r.mark_dead("d0")
    assert r.pick_decode("p1", 100) == "d1"
    assert r.pick_decode("p1", 100, exclude=("d1",)) is None
    assert r.pick_decode("p1", 100_000) is None  # no instance could ever hold it


def test_promised_blocks_count_until_the_kv_lands():
    r = make_router()
    r.promise("d0", 16 * 60)
    assert r.pick_decode("p0", 10) == "d1"
    r.landed("d0", 16 * 60)
    assert r.decode["d0"].promised_blocks == 0


def test_largest_decode_instance_bounds_what_can_ever_be_served():
    r = make_router()
    assert r.largest_decode_blocks() == 100
    r.mark_dead("d0")
    r.report("d1", free_blocks=5, num_blocks=40)
    assert r.largest_decode_blocks() == 40
