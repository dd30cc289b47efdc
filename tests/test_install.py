"""Installing splitserve puts a top-level package named `kernels` on the path. transformers
probes for the Hugging Face `kernels` hub package by that name; ours must not be mistaken for
it, or transformers would try to pull hub kernels into its models."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import sys, tempfile
    import kernels
    assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__   # ours is the one found
    import transformers
    from transformers.utils import is_kernels_available
    assert not is_kernels_available(), "transformers takes splitserve's kernels for the hub package"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = LlamaForCausalLM.from_pretrained(d).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a, b = model(x).logits, loaded(x).logits
    assert a.shape == (1, 4, 128) and torch.equal(a, b)
    print("ok", transformers.__version__)
""")


def test_transformers_unaffected_by_our_kernels_package(tmp_path):
    # Run outside the checkout, as a user's program would; PYTHONPATH covers an uninstalled tree.
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")
