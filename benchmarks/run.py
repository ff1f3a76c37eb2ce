"""qwen_magic benchmark: what the magic costs on top of the model, measured as ratios in one run.

Run with ``make bench`` (about 5-10 minutes on 2 CPU cores). It prints a table and rewrites
``BENCHMARKS.md``. Every comparison is made within this one run, with the two sides interleaved,
because the machines are shared and noisy; nothing here is a pass/fail test.

Measured on the offline demo model (Qwen2.5-Coder-0.5B-Instruct, bf16):

* load: first-ever (assemble + verify + convert, in a scratch cache, in a new process), cached load
  in a new process, and a repeated ``%qwen_load`` of the same spec;
* time to first token and decode tokens/s: bare ``model.generate`` (the seed recipe) against
  ``%%qwen`` in a real Jupyter kernel with the widget path, same prompt, greedy;
* multi-turn: time to first token at turns 1, 4 and 8 of one conversation, with and without
  KV-cache reuse;
* memory: RSS after load against the weights' size; cancellation latency after an interrupt;
* ``%%qwen --fast`` on the CPU: its static cache as shipped, and compiled anyway, against normal;
* ``%qwen_load demo --quantize none|int8|int4``: decode speed, first reply, load time, peak RSS,
  the fraction of the memory-bandwidth bound, and top-1 agreement and NLL against bf16
  (``benchmarks/quantization.py``; ``python benchmarks/run.py --only quantize`` runs that part
  alone and replaces only its section);
* prompt-lookup decoding on edits, time to first token for long prompts per format, and
  llama.cpp side by side where it is installed (``benchmarks/speed.py``; ``--only edits``,
  ``--only prefill``, ``--only llamacpp``, or several names after one ``--only``);
* the acting loop (``%%qwen --run``): each step's time to first token of a two-step question
  with and without cache reuse, beside step 2's new tokens' prefill alone, and the loop's own
  overhead (``benchmarks/acting.py``; ``--only acting``).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import acting, quantization, speed  # noqa: E402
from benchmarks.common import REPORT, machine_facts, read_section  # noqa: E402
from qwen_magic.presentation import NullView  # noqa: E402
from qwen_magic.storage.atomic import write_atomic  # noqa: E402
from qwen_magic.testing.kernel import kernel  # noqa: E402  (a real ipykernel, shared with the tests)
from qwen_magic.testing.models import compile_on_any_device  # noqa: E402

PROMPT = "Write a short paragraph about why unit tests matter."
NEW_TOKENS = 64
REPEATS = 3
#: The decode ratio is the goal nearest to the noise: more pairs, and the median of their ratios.
STREAM_REPEATS = 5
TURN_QUESTIONS = [
    "What is a Python list?",
    "How is it different from a tuple?",
    "When would I use a set instead?",
    "What about a dict?",
    "Which of these are mutable?",
    "Which can be dictionary keys?",
    "Give one line of code for each.",
    "Summarise our discussion in one sentence.",
]


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_load() -> dict[str, float]:
    print("load: first-ever conversion in a scratch cache (about a minute)…", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        first = run_python(
            "import json, time\n"
            "from qwen_magic.backends.kernel.demo_model import ensure_demo_model\n"
            "t = time.perf_counter(); ensure_demo_model(progress=lambda m: None)\n"
            "print(json.dumps({'seconds': time.perf_counter() - t}))",
            env={"QWEN_MAGIC_CACHE": scratch},
        )
    print("load: cached load in a new process…", flush=True)
    cached = run_python(
        "import json, time\n"
        "t = time.perf_counter()\n"
        "import qwen_magic; loaded = qwen_magic.load('demo', progress=None)\n"
        "total = time.perf_counter() - t\n"
        "t = time.perf_counter()\n"
        "for _ in range(200): qwen_magic.load('demo', progress=None)\n"
        "again = (time.perf_counter() - t) / 200\n"
        "import psutil\n"
        "rss_loaded = psutil.Process().memory_info().rss\n"
        "import io; from qwen_magic.notebook.views import TextView\n"
        "qwen_magic.Chat().ask('Say hi.', view=TextView(io.StringIO()),\n"
        "  options=qwen_magic.GenerationOptions(8))\n"
        "print(json.dumps({'seconds': total, 'inside_load': loaded.load_seconds, 'again': again,\n"
        "  'rss': rss_loaded, 'rss_after_reply': psutil.Process().memory_info().rss,\n"
        "  'weights': loaded.memory_bytes}))"
    )
    return {
        "first_ever_s": first["seconds"],
        "cached_new_process_s": cached["seconds"],
        "cached_load_call_s": cached["inside_load"],
        "repeat_load_ms": cached["again"] * 1000,
        "rss_after_load_gib": cached["rss"] / 2**30,
        "rss_after_reply_gib": cached["rss_after_reply"] / 2**30,
        "weights_gib": cached["weights"] / 2**30,
    }


def bare_generate(loaded, threaded: bool = True) -> dict[str, float]:
    """The seed recipe: chat template, generate on a thread with TextIteratorStreamer; or
    (``threaded=False``) plain ``generate`` on this thread with no streamer, the model's own
    speed."""
    import torch
    from transformers import StoppingCriteria, TextIteratorStreamer

    model, tokenizer = loaded.model, loaded.tokenizer
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": PROMPT},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="pt").to(model.device)
    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    kwargs = {
        **inputs,
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "stopping_criteria": [Stamp()],
    }
    started = time.perf_counter()
    if threaded:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=model.generate, kwargs={**kwargs, "streamer": streamer})
        worker.start()
        reply = "".join(streamer)
        worker.join()
    else:
        output = model.generate(**kwargs)
        new_ids = output[0, inputs["input_ids"].shape[1] :]
        reply = tokenizer.decode(new_ids, skip_special_tokens=True)
    tokens = len(stamps)
    return {
        "first_token_s": stamps[0] - started,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / (stamps[-1] - stamps[0]),
        "reply": reply,
    }


def bench_streaming(loaded) -> dict:
    """%%qwen in a kernel against plain generate in that kernel, interleaved; the seed recipe
    (generate on a thread + TextIteratorStreamer) in this process, for comparison."""
    print(
        "streaming: plain generate and %%qwen in a kernel (widget path), the seed recipe…",
        flush=True,
    )
    plain_runs, bare_runs, magic_runs, redraws = [], [], [], []
    with kernel() as k:
        k.run_ok("%load_ext qwen_magic\n%qwen_load demo --quiet")
        # Each run is a fresh first turn: no cache from the previous run may help %%qwen.
        k.run_ok("import qwen_magic\n%config QwenMagics.reuse_cache = False")
        # Plain generate runs in the kernel too, on the kernel's thread: the same process and
        # model as %%qwen, so their ratio holds the streaming path's cost and nothing else.
        k.run_ok(
            f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
            "from benchmarks.run import bare_generate\n"
            "plain_generate = lambda: bare_generate(qwen_magic.current_session().backend.loaded, "
            "threaded=False)"
        )
        bare_generate(loaded)  # warm-up every side once
        k.value("plain_generate()")
        k.run_ok(f"%%qwen --greedy -n {NEW_TOKENS} --new\n{PROMPT}")
        for _ in range(STREAM_REPEATS):
            plain_runs.append(k.value("plain_generate()"))
            bare_runs.append(bare_generate(loaded))
            updates = []

            def hook(message, updates=updates):
                if message["msg_type"] == "comm_msg":
                    updates.append(message)

            k.run(f"%%qwen --greedy -n {NEW_TOKENS} --new\n{PROMPT}", hook)
            stats = k.value("qwen_magic.current_session().conversations.get().turns[-1].stats")
            magic_runs.append(stats)
            redraws.append(len(updates))
        rss = k.value("__import__('psutil').Process().memory_info().rss")

        # Cancellation latency: interrupt a long reply, time until the cell has ended.
        k.run_ok("%config QwenMagics.redraw_seconds = 0.05")
        seen = threading.Event()
        latency: dict[str, float] = {}

        def hook(message):
            if message["msg_type"] == "comm_msg":
                seen.set()

        def interrupt():
            seen.wait(120)
            time.sleep(1.0)
            latency["sent"] = time.perf_counter()
            k.manager.interrupt_kernel()

        thread = threading.Thread(target=interrupt)
        thread.start()
        k.run(
            "%%qwen --greedy -n 400 --new\nWrite a long essay about the history of computing.", hook
        )
        latency["ended"] = time.perf_counter()
        thread.join()
    bare_tps = statistics.median(r["tokens_per_s"] for r in bare_runs)
    magic_tps = statistics.median(r["tokens_per_second"] for r in magic_runs)
    # Each %%qwen run against the plain run just before it: slow spells hit both sides.
    pair_ratios = [
        magic["tokens_per_second"] / plain["tokens_per_s"]
        for plain, magic in zip(plain_runs, magic_runs, strict=True)
    ]
    return {
        "decode_ratio": statistics.median(pair_ratios),
        "pair_ratios": pair_ratios,
        "plain_first_token_s": statistics.median(r["first_token_s"] for r in plain_runs),
        "plain_tokens_per_s": statistics.median(r["tokens_per_s"] for r in plain_runs),
        "bare_first_token_s": statistics.median(r["first_token_s"] for r in bare_runs),
        "magic_first_token_s": statistics.median(r["first_token_seconds"] for r in magic_runs),
        "bare_tokens_per_s": bare_tps,
        "magic_tokens_per_s": magic_tps,
        "tokens": statistics.median(r["tokens"] for r in bare_runs),
        "magic_tokens": statistics.median(r["new_tokens"] for r in magic_runs),
        "widget_updates": statistics.median(redraws),
        "kernel_rss_gib": rss / 2**30,
        "cancel_latency_s": latency["ended"] - latency["sent"],
    }


def bench_turns(loaded) -> dict:
    """Time to first token at turns 1, 4, 8, with and without KV-cache reuse, interleaved."""
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook
    from qwen_magic.options import GenerationOptions

    print("multi-turn: 8 turns with and without cache reuse…", flush=True)

    options = GenerationOptions(max_new_tokens=32, do_sample=False)
    results: dict[str, list[list[float]]] = {"reuse": [], "no reuse": []}
    replies: dict[str, list[str]] = {}
    for _ in range(REPEATS):
        for label, reuse in (("reuse", True), ("no reuse", False)):
            backend = KernelBackend(loaded)  # new caches: turn 1 starts cold in both columns
            chat = Chat(backend, ConversationBook(), reuse_cache=reuse)
            turns = [chat.ask(q, options=options, view=NullView()) for q in TURN_QUESTIONS]
            results[label].append([t.stats["first_token_seconds"] for t in turns])
            replies[label] = [t.assistant for t in turns]
            prompt_tokens = [t.stats["prompt_tokens"] for t in turns]
    summary = {}
    for label, runs in results.items():
        for turn in (1, 4, 8):
            summary[f"{label} turn {turn}"] = statistics.median(run[turn - 1] for run in runs)
    summary["identical"] = replies["reuse"] == replies["no reuse"]
    summary["prompt_tokens"] = prompt_tokens
    return summary


def bench_fast(loaded) -> dict:
    """``%%qwen --fast`` on this CPU: normal mode, the static cache as shipped (not compiled off
    a GPU), and the static cache compiled anyway (transformers' testing switch), interleaved."""
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.options import GenerationOptions

    print("fast mode on the CPU: normal, static cache, static cache compiled…", flush=True)
    messages = [{"role": "user", "content": PROMPT}]
    forced = compile_on_any_device()
    modes = {"normal": (False, None), "fast": (True, None), "fast compiled": (True, forced)}
    backend = KernelBackend(loaded)  # one static cache for every fast reply, as in a kernel

    def reply(fast: bool, compile_config) -> tuple[float, float, str]:
        loaded.model.generation_config.compile_config = compile_config
        options = GenerationOptions(max_new_tokens=NEW_TOKENS, do_sample=False, fast=fast)
        generation = backend.start(messages, options)
        started = time.perf_counter()
        generation.run()
        seconds = time.perf_counter() - started
        return generation.stats.tokens_per_second, seconds, generation.text

    try:
        first_reply = {label: reply(*mode)[1] for label, mode in modes.items()}  # compiles
        speeds: dict[str, list[float]] = {label: [] for label in modes}
        texts: dict[str, str] = {}
        for _ in range(REPEATS):
            for label, mode in modes.items():
                tokens_per_s, _seconds, texts[label] = reply(*mode)
                speeds[label].append(tokens_per_s)
    finally:
        loaded.model.generation_config.compile_config = None
    tps = {label: statistics.median(runs) for label, runs in speeds.items()}
    return {
        "tokens_per_s": tps,
        "first_reply_s": first_reply,
        "same_text": {label: texts[label] == texts["normal"] for label in modes},
    }


OVERFLOW_CONTEXT = 1024
OVERFLOW_TURNS = 36


def bench_overflow(loaded) -> dict:
    """A conversation that outgrows its context (``--fast`` with a 1,024-token static cache):
    time to first token of follow-ups before the first overflow and after it."""
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook
    from qwen_magic.options import GenerationOptions

    print(f"overflow: {OVERFLOW_TURNS} turns in a {OVERFLOW_CONTEXT}-token context…", flush=True)
    options = GenerationOptions(
        max_new_tokens=24, do_sample=False, fast=True, fast_cache_tokens=OVERFLOW_CONTEXT
    )
    chat = Chat(KernelBackend(loaded), ConversationBook())
    rows = []
    for number in range(OVERFLOW_TURNS):
        question = f"{TURN_QUESTIONS[number % len(TURN_QUESTIONS)]} (question {number + 1})"
        stats = chat.ask(question, options=options, view=NullView()).stats
        rows.append(stats)
    first_overflow = next(i for i, row in enumerate(rows) if row["dropped_turns"])
    before = [row["first_token_seconds"] for row in rows[1:first_overflow]]
    after = [row["first_token_seconds"] for row in rows[first_overflow:]]
    steps = sum(1 for a, b in itertools.pairwise(rows) if b["dropped_turns"] != a["dropped_turns"])
    later = rows[first_overflow:]
    return {
        "first_overflow_turn": first_overflow + 1,
        "before_s": statistics.median(before),
        "after_s": statistics.median(after),
        "after_max_s": max(after),
        "steps": steps,
        "turns_after": len(after),
        "cached_after": statistics.median(row["cached_prompt_tokens"] for row in later),
        "prompt_after": statistics.median(row["prompt_tokens"] for row in later),
    }


def bench_server() -> dict:
    """``%%qwen`` over a server (``transformers serve`` on the demo model, this CPU) against a
    bare ``openai`` stream, interleaved; the same against a steady stand-in server, which leaves
    only the client's own cost to vary; and time to first token at turns 1, 4 and 8 there."""
    from benchmarks import server as server_bench
    from qwen_magic.backends.kernel.demo_model import ensure_demo_model
    from qwen_magic.backends.server import ServerBackend
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook
    from qwen_magic.options import GenerationOptions
    from qwen_magic.testing.serving import ServeProcess, serve_missing

    if why := serve_missing():
        return {"missing": why}
    print("server: %%qwen over transformers serve vs a bare openai stream…", flush=True)
    with server_bench.synthetic_server() as synthetic_url:
        steady = server_bench.measure(synthetic_url)
    steady["server"] = "a steady stand-in server (no model)"
    log = Path(tempfile.mkdtemp(prefix="qwen-magic-bench-")) / "serve.log"
    served = ServeProcess(ensure_demo_model(progress=lambda message: None), log).start()
    try:
        real = server_bench.measure(served.url)
        backend = ServerBackend.connect(served.url, progress=None)
        chat = Chat(backend, ConversationBook())
        options = GenerationOptions(max_new_tokens=32, do_sample=False)
        turns = [chat.ask(q, options=options, view=NullView()) for q in TURN_QUESTIONS]
        backend.close()
    finally:
        served.stop()
    return {
        "steady": steady,
        "real": real,
        "steady_markdown": server_bench.markdown(steady),
        "real_markdown": server_bench.markdown(real),
        "turn_ttft": {n: turns[n - 1].stats["first_token_seconds"] for n in (1, 4, 8)},
    }


def server_section(server: dict) -> list[str]:
    if "missing" in server:
        return ["## `%%qwen` over a server", "", f"Not measured: {server['missing']}.", ""]
    steady = server["steady"]
    ttft = server["turn_ttft"]
    return [
        "## `%%qwen` over a server",
        "",
        "`%qwen_load --server URL` streams through `ServerBackend` (the `openai` SDK, read on a "
        "worker thread). Against a steady stand-in server the client's own cost is measured "
        f"alone: decode {steady['decode_ratio_median']:.3f}× a bare `openai` stream, time to "
        f"first token {1000 * steady['ttft_overhead_median_s']:+.1f} ms. Against "
        "`transformers serve` on this CPU the model's own speed swings with the machine's load "
        "(see the load average), so that row is the one to read with care.",
        "",
        server["steady_markdown"].replace("## Server backend", "### Server backend"),
        "",
        server["real_markdown"].replace("## Server backend", "### Server backend"),
        "",
        f"Time to first token over `transformers serve` at turns 1, 4 and 8 of one conversation: "
        f"{ttft[1]:.2f}, {ttft[4]:.2f}, {ttft[8]:.2f} s. `transformers serve` caches no "
        "prefixes, so each turn reads the whole prompt; vLLM (automatic prefix caching) and "
        "SGLang (radix cache) reuse the shared prefix of a follow-up on their side.",
        "",
    ]


def bench_quantize() -> dict:
    """``--quantize none|int8|int4`` on the demo model, each against bf16 in the same run."""
    print("quantize: none, int8, int4 (about 5 minutes)…", flush=True)
    return quantization.bench_quantize()


def main() -> None:
    import torch

    import qwen_magic

    torch.set_num_threads(os.cpu_count() or 1)
    if sys.argv[1:] == ["--only", "quantize"]:
        result = bench_quantize()
        print(quantization.section(result))
        quantization.write_only_this_section(result, REPORT)
        return
    if sys.argv[1:2] == ["--only"] and set(sys.argv[2:]) <= {*speed.SECTIONS, "acting"}:
        speed.write_only_sections([n for n in sys.argv[2:] if n != "acting"], REPORT)
        if "acting" in sys.argv[2:]:
            acting.write_only_this_section(REPORT)
        return
    facts = machine_facts()
    load = bench_load()
    loaded = qwen_magic.load("demo", progress=None)
    streaming = bench_streaming(loaded)
    turns = bench_turns(loaded)
    fast = bench_fast(loaded)
    overflow = bench_overflow(loaded)
    server = bench_server()
    del loaded
    quant = bench_quantize()
    report = render(facts, load, streaming, turns, fast, overflow, server, quant)
    report = report.rstrip("\n") + "\n\n" + "\n".join(speed.run_section(n) for n in speed.SECTIONS)
    report += "\n" + acting.section(acting.bench_acting())
    print(report)
    write_atomic(REPORT, report)


def render(
    facts: dict,
    load: dict,
    streaming: dict,
    turns: dict,
    fast: dict,
    overflow: dict,
    server: dict,
    quant: dict | None = None,
) -> str:
    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    ratio_8 = turns["reuse turn 8"] / turns["reuse turn 1"]
    ratio_8_without = turns["no reuse turn 8"] / turns["no reuse turn 1"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`benchmarks/run.py`); every ratio compares two measurements "
        f"taken in the same run, interleaved, median of {REPEATS} (streaming: "
        f"{STREAM_REPEATS}). Model: the offline demo "
        "model, Qwen2.5-Coder-0.5B-Instruct, bf16.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in facts.items()],
        f"- date: {time.strftime('%Y-%m-%d')}",
        "",
        "## Goals",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| `%%qwen` decode ≥ 0.97× plain `generate` (in the same kernel, no streamer) "
        f"| {streaming['decode_ratio']:.3f}× "
        f"(median of {STREAM_REPEATS} interleaved pairs, range "
        f"{min(streaming['pair_ratios']):.3f}–{max(streaming['pair_ratios']):.3f}; "
        f"{streaming['magic_tokens_per_s']:.2f} vs {streaming['plain_tokens_per_s']:.2f} "
        "tokens/s) "
        f"| {mark(streaming['decode_ratio'] >= 0.97)} |",
        f"| time to first token at turn 8 ≤ 1.3× turn 1 (cache reuse) | {ratio_8:.2f}× "
        f"(without reuse: {ratio_8_without:.2f}×) | {mark(ratio_8 <= 1.3)} |",
        f"| time to first token after the context overflows ≤ 1.3× a follow-up's before "
        f"| {overflow['after_s'] / overflow['before_s']:.2f}× "
        f"({overflow['after_s']:.3f} vs {overflow['before_s']:.3f} s, medians) "
        f"| {mark(overflow['after_s'] <= 1.3 * overflow['before_s'])} |",
        f"| greedy replies identical with and without reuse | {turns['identical']} "
        f"| {mark(turns['identical'])} |",
        f"| repeated `%qwen_load` ≤ 10 ms | {load['repeat_load_ms']:.4f} ms "
        f"| {mark(load['repeat_load_ms'] <= 10)} |",
        f"| cached demo load in a new process ≤ 6 s | {load['cached_new_process_s']:.1f} s "
        f"(imports included; the load call itself {load['cached_load_call_s']:.1f} s) "
        f"| {mark(load['cached_new_process_s'] <= 6)} |",
        f"| memory after load close to the weights | RSS {load['rss_after_reply_gib']:.2f} GiB "
        f"after the first reply ({load['rss_after_load_gib']:.2f} GiB right after loading: "
        f"safetensors are memory-mapped) for {load['weights_gib']:.2f} GiB of weights "
        f"({load['rss_after_reply_gib'] / load['weights_gib']:.2f}×) "
        f"| {mark(load['rss_after_reply_gib'] <= 1.5 * load['weights_gib'])} |",
        "",
        "## Loading",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| first-ever `%qwen_load demo` (assemble, verify, convert; new process) "
        f"| {load['first_ever_s']:.1f} |",
        f"| cached load, new process (imports + load) | {load['cached_new_process_s']:.1f} |",
        f"| repeated `%qwen_load demo` | {load['repeat_load_ms'] / 1000:.6f} |",
        "",
        "## Streaming",
        "",
        f'Prompt: "{PROMPT}", greedy, {NEW_TOKENS} new tokens at most '
        f"({streaming['tokens']:.0f} generated by bare generate, {streaming['magic_tokens']:.0f} "
        "by `%%qwen`).",
        "",
        "| | time to first token (s) | decode tokens/s |",
        "|---|---|---|",
        f"| plain `model.generate` on the kernel's thread, no streamer "
        f"| {streaming['plain_first_token_s']:.2f} | {streaming['plain_tokens_per_s']:.2f} |",
        f"| the seed recipe: `model.generate` on a thread + `TextIteratorStreamer` "
        f"| {streaming['bare_first_token_s']:.2f} | {streaming['bare_tokens_per_s']:.2f} |",
        f"| `%%qwen` in a Jupyter kernel, widget view | {streaming['magic_first_token_s']:.2f} "
        f"| {streaming['magic_tokens_per_s']:.2f} |",
        "",
        "The seed recipe runs here in the benchmark's own process, whose main thread has run "
        "no parallel torch work. Where it has (a `generate` on it, a quantizing load, the user's "
        "own tensors), its OpenMP team and the generating thread's make libgomp stop spinning "
        "between parallel regions, and the seed recipe decodes up to 1.5× slower; `%%qwen` lets "
        "the kernel thread's team go before each reply "
        "(`qwen_magic/backends/kernel/openmp.py`), and the plain "
        "`generate` above ran on the kernel's thread before every `%%qwen` reply.",
        "",
        f"The Output widget received {streaming['widget_updates']:.0f} updates per reply "
        "(throttled redraws, not one per token). Kernel RSS with the model loaded: "
        f"{streaming['kernel_rss_gib']:.2f} GiB. Cancellation: "
        f"{streaming['cancel_latency_s']:.2f} s from the kernel interrupt to the cell's end "
        "(the worker stops after the current token and is joined).",
        "",
        "## Multi-turn time to first token",
        "",
        f"Eight questions in one conversation, greedy, 32 new tokens at most; prompt tokens per "
        f"turn: {', '.join(map(str, turns['prompt_tokens']))}.",
        "",
        "| turn | with cache reuse (s) | without (s) |",
        "|---|---|---|",
        *[
            f"| {turn} | {turns[f'reuse turn {turn}']:.3f} | {turns[f'no reuse turn {turn}']:.3f} |"
            for turn in (1, 4, 8)
        ],
        "",
        "## When the conversation outgrows the context",
        "",
        f"{OVERFLOW_TURNS} questions, greedy, 24 new tokens at most, `--fast` with a "
        f"{OVERFLOW_CONTEXT}-token static cache as the context. The first overflow came at turn "
        f"{overflow['first_overflow_turn']}; after it, the oldest turns were left out in "
        f"{overflow['steps']} steps over {overflow['turns_after']} turns (a quarter of the context "
        "at a time), so a follow-up still reused a median of "
        f"{overflow['cached_after']:.0f} of its {overflow['prompt_after']:.0f} prompt tokens. "
        f"Time to first token: {overflow['before_s']:.3f} s before the overflow, "
        f"{overflow['after_s']:.3f} s after it (median; the slowest, a turn that re-read the "
        f"prompt after a step, {overflow['after_max_s']:.3f} s).",
        "",
        *server_section(server),
        "## `%%qwen --fast` on this CPU",
        "",
        f"Same prompt as above, greedy, {NEW_TOKENS} new tokens; each mode's first reply timed "
        "apart (for the compiled row it includes compiling). transformers compiles the static "
        "cache's decoding step only on a GPU; the last row forces it here to show why.",
        "",
        "| mode | first reply (s) | decode tokens/s | × normal | same text as normal |",
        "|---|---|---|---|---|",
        *[
            f"| {label} | {fast['first_reply_s'][key]:.1f} | {fast['tokens_per_s'][key]:.2f} "
            f"| {fast['tokens_per_s'][key] / fast['tokens_per_s']['normal']:.2f}× "
            f"| {fast['same_text'][key]} |"
            for key, label in (
                ("normal", "normal (dynamic cache)"),
                ("fast", "`--fast`: static cache, not compiled (as shipped off a GPU)"),
                ("fast compiled", "`--fast`, compiled anyway (`torch.compile`, inductor)"),
            )
        ],
        "",
        quantization.section(quant) if quant else existing_section(quantization.HEADING),
        existing_gpu_section(),
    ]
    return "\n".join(lines)


GPU_PLACEHOLDER = """## GPU

Not measured yet. Run `make bench-gpu` on a CUDA machine (`benchmarks/gpu.py`): it replaces this
section with the card's name and its numbers.
"""


def existing_section(heading: str) -> str:
    """A section of the current BENCHMARKS.md, kept as it is ("" if there is none)."""
    try:
        return read_section(REPORT.read_text(), heading) or ""
    except OSError:
        return ""


def existing_gpu_section() -> str:
    """The GPU section `make bench-gpu` wrote (kept: this CPU benchmark cannot redo it)."""
    try:
        text = REPORT.read_text()
    except OSError:
        return GPU_PLACEHOLDER
    return read_section(text, "GPU") or GPU_PLACEHOLDER


if __name__ == "__main__":
    main()
