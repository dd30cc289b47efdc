"""The step loop's single-owner contract and its time accounting."""

import time

import pytest

from engine.serving_loop import ServingLoop


def test_calls_run_on_the_loop_thread_and_steps_are_accounted():
    work = {"left": 5}

    def step() -> bool:
        if work["left"] == 0:
            return False
        work["left"] -= 1
        t = time.thread_time()
        while time.thread_time() - t < 0.004:   # CPU work, so thread time counts it
            pass
        return True
    loop = ServingLoop(step, "t")
    loop.start()
    try:
        assert loop.call(lambda: 41 + 1).result(timeout=5) == 42
        deadline = time.monotonic() + 5
        while work["left"] and time.monotonic() < deadline:
            time.sleep(0.01)
        times = loop.times()
    finally:
        loop.stop()
    assert times["steps"] == 5                      # idle passes are not steps
    assert times["step_cpu_s"] >= 5 * 0.004
    assert times["step_s"] >= times["step_cpu_s"] * 0.9
    assert times["process_cpu_s"] > 0


def test_a_failing_call_reaches_its_caller_and_the_loop_goes_on():
    loop = ServingLoop(lambda: False, "t")
    loop.start()
    try:
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda: 1 / 0).result(timeout=5)
        assert loop.call(lambda: "alive").result(timeout=5) == "alive"
    finally:
        loop.stop()
