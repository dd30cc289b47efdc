"""benchmarks/codec_speed.py runs end to end at tiny sizes on CPU (kernels interpreted), so the
GPU run is not the first time its code paths execute."""

import json
import os

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the smoke mode is the CPU stand-in for the GPU benchmark")
def test_codec_speed_cpu_smoke(tmp_path, device):
    from benchmarks import codec_speed
    out = tmp_path / "speed.json"
    assert codec_speed.main(["--cpu-smoke", "--iters", "1", "--chunks", "12", "--levels", "default,lossless",
                             "--baselines", "--channel", "raw,default", "--stages", "--out", str(out)]) == 0
    from kvtransfer.codec import gpu
    assert not gpu.decodes_on(torch.device("cpu"))     # the smoke mode's switch does not leak
    rows = {r["level"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["default"]["same_bytes"] is True and rows["lossless"]["same_bytes"] is True
    assert rows["channel raw"]["bits_per_element"] == 16.0
    assert rows["channel default"]["unpack_ms"] > 0 and "cachegen12" not in rows
    assert any(name.startswith("cachegen") for name in rows)
    assert rows["stage quantize+histogram (ms)"]["encode_GBps"] > 0
    for name, r in rows.items():
        assert r["chunk"] == 12 and (name.startswith("stage") or r["bits_per_element"] > 0)
