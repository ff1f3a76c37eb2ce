"""``make bench``'s speed sections: Edits (prompt lookup), Prefill, llama.cpp side by side.

Each runs on the demo model in this process through the in-kernel backend (what ``%%qwen``
runs, without the widget), greedy, with the two sides of every comparison interleaved in one
run, because the machines are shared and noisy. ``python benchmarks/run.py --only edits``
(``prefill``, ``llamacpp``) runs one and replaces only its section of BENCHMARKS.md.

* **Edits**: a follow-up that renames a function in a 25-line code block the previous reply
  wrote, one that adds a docstring to it, and an open-ended paragraph; decode tokens/s with
  and without prompt lookup, whether the text is the same, the drafted tokens accepted per
  step; bf16 (lookup on request: ``--lookup``) and int4 (lookup ``auto``). The memory read
  bandwidth is measured in the same run: one-token decoding is bound by bandwidth ÷ bytes read
  per token, and each figure is shown as a fraction of that bound (lookup may exceed 1: it
  reads the weights once for several tokens).
* **Prefill**: time to first token for ~1,000 and ~4,000 prompt tokens, bf16 / int8 / int4,
  and int4 / int8 with the many-row path switched off (their kernels for every row).
* **llama.cpp**: where ``llama_cpp`` is importable (never a test dependency), the demo GGUF
  with the same prompts and thread count beside ``%%qwen`` int4 and bf16; skipped with a note
  otherwise.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_name, replace_section, say

EDITS, PREFILL, LLAMA = "Edits: prompt-lookup decoding", "Prefill", "llama.cpp side by side"
CODE = "\n".join(
    [
        "import csv",
        "from dataclasses import dataclass",
        "",
        "",
        "@dataclass",
        "class Order:",
        "    customer: str",
        "    amount: float",
        "    paid: bool",
        "",
        "",
        "def load_orders(path):",
        "    orders = []",
        "    with open(path, newline='') as handle:",
        "        for row in csv.DictReader(handle):",
        "            paid = row['paid'] == 'yes'",
        "            orders.append(Order(row['customer'], float(row['amount']), paid))",
        "    return orders",
        "",
        "",
        "def unpaid_total(orders):",
        "    total = 0.0",
        "    for order in orders:",
        "        if not order.paid:",
        "            total += order.amount",
        "    return total",
        "",
        "",
        "print(unpaid_total(load_orders('orders.csv')))",
    ]
)
EDIT_NEW_TOKENS = 200
PROSE = "Write a short paragraph about why unit tests matter."
PROSE_NEW_TOKENS = 96


def edit_conversation(instruction: str) -> list[dict[str, str]]:
    """A follow-up about the code the previous reply wrote."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write Python that totals the unpaid orders in a CSV file."},
        {"role": "assistant", "content": f"```python\n{CODE}\n```"},
        {"role": "user", "content": instruction + " Reply with the whole code only."},
    ]


TASKS = {
    "rename": edit_conversation("Rename the function unpaid_total to sum_unpaid."),
    "docstring": edit_conversation("Add a one-line docstring to load_orders."),
    "prose": [{"role": "user", "content": PROSE}],
}


def _reply(backend: Any, messages: list[dict[str, str]], tokens: int, lookup: str) -> dict:
    from qwen_magic.options import GenerationOptions

    options = GenerationOptions(max_new_tokens=tokens, do_sample=False, prompt_lookup=lookup)
    reply = backend.start(messages, options)
    reply.run()
    policy = reply.lookup
    return {
        "text": reply.text,
        "tokens": reply.stats.new_tokens,
        "tps": reply.stats.tokens_per_second,
        "first_s": reply.stats.first_token_seconds,
        "accepted_per_step": policy.accepted_per_step if policy else 0.0,
        "summary": policy.summary() if policy else "",
    }


def _load(fmt: str) -> Any:
    import qwen_magic

    return qwen_magic.load("demo", quantize=fmt, progress=None)


def bench_edits() -> dict:
    """Per format and task: plain and lookup decode, interleaved (plain first, then lookup)."""
    from benchmarks.quantization import bytes_per_token, memory_bandwidth
    from qwen_magic.backends.kernel.backend import KernelBackend

    say("edits: memory bandwidth…")
    bandwidth = memory_bandwidth()
    rows = []
    for fmt, lookup in (("none", "on"), ("int4", "auto")):
        loaded = _load(fmt)
        backend = KernelBackend(loaded)
        bound = bandwidth / bytes_per_token(loaded)
        _reply(backend, TASKS["prose"], 8, "off")  # warm up
        for task, messages in TASKS.items():
            tokens = PROSE_NEW_TOKENS if task == "prose" else EDIT_NEW_TOKENS
            say(f"edits: {fmt} {task}…")
            plain = _reply(backend, messages, tokens, "off")
            drafted = _reply(backend, messages, tokens, lookup)
            rows.append(
                {
                    "format": "bf16" if fmt == "none" else fmt,
                    "lookup": lookup,
                    "task": task,
                    "plain": plain,
                    "drafted": drafted,
                    "speedup": drafted["tps"] / plain["tps"] if plain["tps"] else 0.0,
                    "same_text": drafted["text"] == plain["text"],
                    "bound_tps": bound,
                }
            )
        del backend, loaded
    return {"rows": rows, "bandwidth_gbs": bandwidth / 1e9, "cpu": cpu_name()}


def _long_prompt(tokenizer: Any, tokens: int) -> list[dict[str, str]]:
    """A user message of about ``tokens`` tokens: the code block repeated, then a question."""
    per_copy = len(tokenizer(CODE).input_ids)
    copies = max(1, round((tokens - 30) / per_copy))
    text = "\n\n".join([CODE] * copies)
    return [{"role": "user", "content": f"```python\n{text}\n```\nWhat does this code do?"}]


#: Prefill: rounds per prompt length (the order of the formats reversed every round); the
#: quantized kernels for every row, the slow "before" reference, only in the first rounds.
PREFILL_ROUNDS, KERNEL_ROUNDS = {1000: 6, 4000: 2}, 2


def bench_prefill() -> dict:
    """Time to first token (one new token) per format and prompt length, rounds interleaved;
    each ratio to bf16 is the median of the rounds' own ratios (the machine's load drifts)."""
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.backends.kernel.quantize import prefill as quantized_prefill

    backends = {fmt: KernelBackend(_load(fmt)) for fmt in ("none", "int8", "int4")}
    tokenizer = backends["none"].loaded.tokenizer
    prompts = {n: _long_prompt(tokenizer, n) for n in (1000, 4000)}
    sizes = {n: backends["none"].count_tokens(p) for n, p in prompts.items()}
    runs = [("bf16", "none", True), ("int8", "int8", True), ("int4", "int4", True)]
    runs += [("int8, its kernel", "int8", False), ("int4, its kernel", "int4", False)]
    times: dict[tuple[str, int], list[float]] = {}
    for backend in backends.values():
        _reply(backend, TASKS["prose"], 2, "off")  # warm up
    for length, rounds in PREFILL_ROUNDS.items():
        for round_ in range(rounds):
            order = runs if round_ % 2 == 0 else runs[::-1]
            for name, fmt, many_rows in order:
                if not many_rows and (length == 4000 or round_ >= KERNEL_ROUNDS):
                    continue  # the kernels' prefill is the slow path: two rounds show it
                say(f"prefill: {name}, {sizes[length]} tokens…")
                saved = quantized_prefill.MANY_ROWS
                quantized_prefill.MANY_ROWS = saved if many_rows else 10**9
                try:
                    first = _reply(backends[fmt], prompts[length], 1, "off")["first_s"]
                finally:
                    quantized_prefill.MANY_ROWS = saved
                times.setdefault((name, length), []).append(first)
    ratios = {
        (name, n): [t / base for t, base in zip(v, times[("bf16", n)], strict=False)]
        for (name, n), v in times.items()
    }
    return {
        "tokens": sizes,
        "first_s": {f"{name}|{n}": statistics.median(v) for (name, n), v in times.items()},
        "ratio": {f"{name}|{n}": statistics.median(v) for (name, n), v in ratios.items()},
        "ratio_range": {f"{name}|{n}": (min(v), max(v)) for (name, n), v in ratios.items()},
        "range": {f"{name}|{n}": (min(v), max(v)) for (name, n), v in times.items()},
        "rounds": PREFILL_ROUNDS,
        "cpu": cpu_name(),
    }


#: llama.cpp side by side: rounds, each engine once per round, the order reversed every round.
LLAMA_ROUNDS = 3
LLAMA_NEW_TOKENS = 64
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def bench_llama_cpp() -> dict:
    """The demo GGUF in llama.cpp beside %%qwen int4 and bf16: the same chat messages (an
    explicit system prompt, so neither template adds its own), the same thread count, greedy,
    the engines interleaved; medians of the rounds."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama_cpp is not importable here (pip install llama-cpp-python)"}
    import llama_cpp
    import torch

    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.backends.kernel.demo_model import assemble_gguf

    threads = torch.get_num_threads()  # what %%qwen runs with (run.py sets it)
    backends = {"%%qwen bf16": KernelBackend(_load("none"))}
    backends["%%qwen int4"] = KernelBackend(_load("int4"))
    tokenizer = backends["%%qwen bf16"].loaded.tokenizer
    short = [SYSTEM, *TASKS["prose"]]
    long = [SYSTEM, *_long_prompt(tokenizer, 1000)]
    samples: dict[str, dict[str, list[float]]] = {}
    texts: dict[str, str] = {}
    prompt_tokens: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        gguf = Path(scratch) / "demo.gguf"
        assemble_gguf(gguf, progress=say)
        llama = llama_cpp.Llama(
            str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        _llama_decode(llama, short, 4)  # warm up every engine once
        for backend in backends.values():
            _reply(backend, short, 4, "off")
        engines = ["llama.cpp", *backends]
        for round_ in range(LLAMA_ROUNDS):
            for name in engines if round_ % 2 == 0 else engines[::-1]:
                say(f"llama.cpp side by side: {name}, round {round_ + 1}…")
                if name == "llama.cpp":
                    decode = _llama_decode(llama, short, LLAMA_NEW_TOKENS)
                    first = _llama_first_token(llama, long)
                else:
                    decode = _reply(backends[name], short, LLAMA_NEW_TOKENS, "off")
                    first = _reply(backends[name], long, 1, "off")
                    first["prompt_tokens"] = backends[name].count_tokens(long)
                row = samples.setdefault(name, {"tps": [], "first_s": [], "tokens": []})
                row["tps"].append(decode["tps"])
                row["tokens"].append(decode["tokens"])
                row["first_s"].append(first["first_s"])
                texts[name] = decode["text"]
                prompt_tokens[name] = first["prompt_tokens"]
        del llama
    results = {
        name: {
            "tps": statistics.median(row["tps"]),
            "tps_range": (min(row["tps"]), max(row["tps"])),
            "first_s": statistics.median(row["first_s"]),
            "first_range": (min(row["first_s"]), max(row["first_s"])),
            "tokens": statistics.median(row["tokens"]),
            "prompt_tokens": prompt_tokens[name],
            "text": texts[name],
        }
        for name, row in samples.items()
    }
    return {
        "results": results,
        "threads": threads,
        "version": llama_cpp.__version__,
        "cpu": cpu_name(),
        "rounds": LLAMA_ROUNDS,
    }


def _llama_decode(llama: Any, messages: list[dict[str, str]], tokens: int) -> dict:
    """Stream a greedy reply; decode tokens/s after the first token (one chunk per token)."""
    llama.reset()
    first, count, text = None, 0, []
    stream = llama.create_chat_completion(
        messages, max_tokens=tokens, temperature=0, top_k=1, stream=True
    )
    for chunk in stream:
        if content := chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            count += 1
            text.append(content)
    end = time.perf_counter()
    tps = (count - 1) / (end - first) if first and count > 1 and end > first else 0.0
    return {"tps": tps, "tokens": count, "text": "".join(text)}


def _llama_first_token(llama: Any, messages: list[dict[str, str]]) -> dict:
    """Seconds to read the whole prompt and make one token (the prefix cache reset first)."""
    llama.reset()  # no prefix reuse: the whole prompt is read
    started = time.perf_counter()
    answer = llama.create_chat_completion(messages, max_tokens=1, temperature=0, top_k=1)
    return {
        "first_s": time.perf_counter() - started,
        "prompt_tokens": answer["usage"]["prompt_tokens"],
    }


# -- sections -----------------------------------------------------------------------------


def edits_section(result: dict) -> str:
    lines = [
        f"## {EDITS}",
        "",
        f"Measured on {result['cpu']}, 2 threads, in one run, each plain reply followed by the "
        "same request with lookup; the machine was shared with other developers' work while it "
        "ran, so absolute speeds are low and only the ratios in a row compare. Greedy; decode "
        "tokens/s after the first token. bf16 uses lookup on request (`--lookup`), int4 by "
        "default (`auto`). Memory read bandwidth in this run: "
        f"{result['bandwidth_gbs']:.0f} GB/s; the bound is one-token decoding's (bandwidth ÷ "
        "bytes read per token).",
        "",
        "| format | task | plain tokens/s | lookup tokens/s | speed-up | same text | "
        "accepted per step | of the bound (plain / lookup) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        plain, drafted, bound = row["plain"], row["drafted"], row["bound_tps"]
        lines.append(
            f"| {row['format']} | {row['task']} | {plain['tps']:.1f} | {drafted['tps']:.1f} | "
            f"{row['speedup']:.2f}× | {'yes' if row['same_text'] else 'no'} | "
            f"{drafted['accepted_per_step']:.2f} | {plain['tps'] / bound:.2f} / "
            f"{drafted['tps'] / bound:.2f} |"
        )
    lines += [
        "",
        "Rename and docstring: the reply copies the code block of the previous reply; prose: "
        f'"{PROSE}". Up to {EDIT_NEW_TOKENS} new tokens for the edits, {PROSE_NEW_TOKENS} '
        "for the prose.",
    ]
    return "\n".join(lines) + "\n"


def prefill_section(result: dict) -> str:
    sizes, first = result["tokens"], result["first_s"]
    spread = result.get("range", {})
    rounds = result.get("rounds", {1000: 2, 4000: 1})
    lines = [
        f"## {PREFILL}",
        "",
        f"Time to first token on {result['cpu']}, 2 threads, one run, the formats interleaved "
        f"(the order reversed every round; {rounds[1000]} rounds for the shorter prompt, "
        f"{rounds[4000]} for the longer, {KERNEL_ROUNDS} for the kernels' rows; medians, ranges in "
        "brackets; × bf16 is the median of the rounds' own ratios); the machine was shared "
        'with other developers\' work. "its kernel": the quantized kernel for every row, as '
        "before many-row prefill. Goal (issue #20): a quantized model's time to first token for "
        "a ~1,000-token prompt ≤ 1.1× bf16's.",
        "",
        f"| format | {sizes[1000]} tokens | × bf16 | {sizes[4000]} tokens | × bf16 |",
        "|---|---|---|---|---|",
    ]
    names = ["bf16", "int8", "int4", "int8, its kernel", "int4, its kernel"]
    for name in names:
        cells = []
        for n in (1000, 4000):
            value = first.get(f"{name}|{n}")
            base = first.get(f"bf16|{n}")
            if not value or not base:
                cells += ["–", "–"]
                continue
            low, high = spread.get(f"{name}|{n}", (value, value))
            shown = f"{value:.2f} s" + (f" ({low:.2f}–{high:.2f})" if low != high else "")
            ratio = result.get("ratio", {}).get(f"{name}|{n}", value / base)
            low, high = result.get("ratio_range", {}).get(f"{name}|{n}", (ratio, ratio))
            cells += [shown, f"{ratio:.2f}×" + (f" ({low:.2f}–{high:.2f})" if low != high else "")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def llama_section(result: dict) -> str:
    lines = [f"## {LLAMA}", ""]
    if "skipped" in result:
        return (
            "\n".join(
                [
                    *lines,
                    f"Skipped in this run: {result['skipped']}. Build it with `make llama-cpp` "
                    "(README.md says why: on a CPU that reports AMX it needs explicit "
                    "instruction-set flags), then run `python benchmarks/run.py --only llamacpp`.",
                ]
            )
            + "\n"
        )
    results = result["results"]
    int4, bf16 = results.get("%%qwen int4"), results.get("%%qwen bf16")
    lines += [
        f"llama-cpp-python {result['version']} (`make llama-cpp`), the demo GGUF "
        f"(Q4_K_M), on {result['cpu']}, {result['threads']} threads for every engine (torch's "
        "and llama.cpp's), greedy, the same chat messages with an explicit system prompt; "
        f"{result['rounds']} rounds with the engines interleaved (the order reversed every "
        "round), medians, ranges in brackets. Decode: tokens/s after the first over up to "
        f'{LLAMA_NEW_TOKENS} new tokens of "{PROSE}"; first token: a fresh read (no prefix '
        "cache) of the ~1,000-token prompt of the Prefill section, one new token. The machine "
        "was shared with other developers' work.",
        "",
        "| engine | decode tokens/s | × %%qwen int4 | prompt tokens | first token | "
        "× %%qwen bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        low, high = row["tps_range"]
        first_low, first_high = row["first_range"]
        speed = f"{row['tps'] / int4['tps']:.2f}×" if int4 and int4["tps"] else "–"
        first = f"{row['first_s'] / bf16['first_s']:.2f}×" if bf16 and bf16["first_s"] else "–"
        lines.append(
            f"| {name} | {row['tps']:.1f} ({low:.1f}–{high:.1f}) | {speed} | "
            f"{row['prompt_tokens']} | {row['first_s']:.2f} s ({first_low:.2f}–{first_high:.2f}) | "
            f"{first} |"
        )
    lines += ["", "Replies (greedy, first 80 characters):", ""]
    lines += [f"- {name}: {row['text'][:80]!r}" for name, row in results.items()]
    return "\n".join(lines) + "\n"


SECTIONS = {
    "edits": (bench_edits, edits_section),
    "prefill": (bench_prefill, prefill_section),
    "llamacpp": (bench_llama_cpp, llama_section),
}


def run_section(name: str) -> str:
    """Measure one section and return its Markdown."""
    measure, render = SECTIONS[name]
    return render(measure())


def write_only_sections(names: list[str], report: Path) -> None:
    """Measure ``names`` and replace only their sections of ``report``."""
    from qwen_magic.storage.atomic import write_atomic

    for name in names:
        section = run_section(name)
        print(section)
        heading = section.splitlines()[0].removeprefix("## ")
        text = report.read_text() if report.exists() else ""
        write_atomic(report, replace_section(text, heading, section))
