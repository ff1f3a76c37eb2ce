"""``%qwen_load demo --quantize none|int8|int4`` on this CPU: speed, memory and quality.

Part of ``make bench`` (``benchmarks/run.py`` calls :func:`bench_quantize` and puts
:func:`section` in ``BENCHMARKS.md``); ``python benchmarks/run.py --only quantize`` runs this part
alone and replaces only its section. For each format, on the offline demo model:

* **load**: the first-ever quantizing load (its cache removed first) and a cached load, each in a
  new process, imports included; the cached process then answers once (the *first reply*: on
  these eager kernels nothing is compiled) and reports its peak RSS;
* **decode tokens/s**: the three models loaded in one process, greedy replies through the
  ``%%qwen`` path, interleaved round by round; each round's ratio to bf16, median and range;
* **memory-bandwidth bound**: the read bandwidth is measured in the same run (``torch.sum`` over
  1 GiB, best of 5); a format's bound is bandwidth ÷ the bytes one decoded token reads (every
  weight but the embedding table, of which one row is read); the table shows the fraction of it
  each format reaches;
* **quality**: teacher-forced over :data:`TEXTS` (prose, code, chat, Chinese, arithmetic): the
  fraction of positions whose likeliest next token equals bf16's, and the mean negative
  log-likelihood of the actual next token (lower is better);
* **the int8 alternative**: torchao's own int8 weight-only path, eager and compiled with a static
  cache (``--fast`` with the forced-compile ``CompileConfig``), against bf16 in the same process;
  this is the measurement behind using PyTorch's int8 kernel instead (see
  ``qwen_magic/backends/kernel/quantize/int8_linear.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

FORMATS = ("none", "int8", "int4")
PROMPT = "Write a short paragraph about why unit tests matter."
NEW_TOKENS = 64
ROUNDS = 5
#: Fixed texts for teacher-forced agreement and NLL (about 700 tokens in all).
TEXTS = [
    "Unit tests check small pieces of a program in isolation. A good test names the behaviour "
    "it expects, sets up only what it needs, and fails for one reason. When a test suite runs in "
    "seconds, developers run it after every change, and mistakes are caught while the code is "
    "still fresh in their minds. Slow or flaky suites are skipped, and then they protect nobody.",
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n Fibonacci numbers."""\n'
    "    numbers = [0, 1]\n"
    "    while len(numbers) < n:\n"
    "        numbers.append(numbers[-1] + numbers[-2])\n"
    "    return numbers[:n]\n\n\n"
    "def is_palindrome(text: str) -> bool:\n"
    "    cleaned = ''.join(ch.lower() for ch in text if ch.isalnum())\n"
    "    return cleaned == cleaned[::-1]\n\n\n"
    "if __name__ == '__main__':\n"
    "    print(fibonacci(10))\n"
    "    print(is_palindrome('A man, a plan, a canal: Panama'))\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the "
    "capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris."
    "<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\nThe "
    "capital of Germany is Berlin.<|im_end|>\n",
    "The Rhine rises in the Swiss Alps, flows through Lake Constance, forms part of the border "
    "between Germany and France, and reaches the North Sea in the Netherlands. For centuries it "
    "has carried goods between the industrial cities along its banks.",
    "北京是中国的首都，也是一座历史悠久的城市。长城、故宫和天坛每年吸引着来自世界各地的游客。",
    "2 + 2 = 4. 3 * 7 = 21. 100 / 4 = 25. The square root of 81 is 9. Twelve squared is 144, and "
    "the sum of the first ten positive integers is 55.",
]


def run_json(code: str, env: dict[str, str] | None = None, timeout: int = 900) -> dict:
    """Run ``code`` in a new interpreter (repository root on the path); it prints one JSON
    line last."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=ROOT,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


LOAD_AND_REPLY = """
import json, resource, sys, time
started = time.perf_counter()
import qwen_magic
loaded = qwen_magic.load("demo", quantize={fmt!r}, progress=None)
load_s = time.perf_counter() - started
from qwen_magic.backends.kernel.backend import KernelBackend
from qwen_magic.options import GenerationOptions
reply = KernelBackend(loaded).start(
    [{{"role": "user", "content": {prompt!r}}}],
    GenerationOptions(max_new_tokens={tokens}, do_sample=False),
)
started = time.perf_counter()
reply.run()
print(json.dumps({{
    "load_s": load_s,
    "first_reply_s": time.perf_counter() - started,
    "first_reply_tokens": reply.stats.new_tokens,
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over the fork)
    "peak_rss": next(
        int(line.split()[1]) * 1024 for line in open("/proc/self/status")
        if line.startswith("VmHWM:")
    ) if sys.platform.startswith("linux")
    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "notices": loaded.notices,
}}))
"""

TORCHAO_INT8 = """
import dataclasses, json, statistics, time
import torch
import qwen_magic
from qwen_magic.backends.kernel import loading
from qwen_magic.backends.kernel.quantize import formats as quantize
from qwen_magic.backends.kernel.backend import KernelBackend
from qwen_magic.options import GenerationOptions
from qwen_magic.testing.models import compile_on_any_device
from transformers import AutoModelForCausalLM, TorchAoConfig

bf16 = qwen_magic.load("demo", progress=None)
with quantize.quiet_torchao_import():
    from torchao.quantization import Int8WeightOnlyConfig

    # torchao's defaults, including its recommended inductor settings for compiling
    model = AutoModelForCausalLM.from_pretrained(
        bf16.source, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=[]),
    ).eval()
int8 = dataclasses.replace(bf16, model=model, quantization="int8")
messages = [{{"role": "user", "content": {prompt!r}}}]

def reply(loaded, tokens, fast=False, backend=None):
    options = GenerationOptions(max_new_tokens=tokens, do_sample=False, fast=fast)
    generation = (backend or KernelBackend(loaded)).start(messages, options)
    started = time.perf_counter()
    generation.run()
    return generation.stats.tokens_per_second, time.perf_counter() - started

eager = [reply(int8, 24)[0] for _ in range(2)]
eager_bf16 = [reply(bf16, 24)[0] for _ in range(2)]
model.generation_config.compile_config = compile_on_any_device()
fast = KernelBackend(int8)
first_tps, first_s = reply(int8, {tokens}, fast=True, backend=fast)  # compiles
pairs = []
for _ in range({rounds}):
    plain = reply(bf16, {tokens})[0]
    compiled = reply(int8, {tokens}, fast=True, backend=fast)[0]
    pairs.append((plain, compiled))
print(json.dumps({{
    "eager_tps": statistics.median(eager), "eager_bf16_tps": statistics.median(eager_bf16),
    "compiled_first_reply_s": first_s, "pairs": pairs,
}}))
"""


def memory_bandwidth() -> float:
    """Read bandwidth in bytes/s: ``torch.sum`` over 1 GiB of bf16, best of 5."""
    import torch

    data = torch.ones(2**29, dtype=torch.bfloat16)
    data.sum()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * data.element_size() / best


def bytes_per_token(loaded: Any) -> int:
    """Bytes one decoded token reads: every weight but the embedding table (one row of it is
    read), unless the table is also the output layer."""
    from qwen_magic.backends.kernel.quantize.formats import weight_bytes

    model = loaded.model
    table = model.get_input_embeddings().weight
    tied = table is getattr(model.get_output_embeddings(), "weight", None)
    return weight_bytes(model) - (0 if tied else table.numel() * table.element_size())


def teacher_forced(models: dict[str, Any], tokenizer: Any) -> dict[str, dict[str, float]]:
    """Per format: top-1 agreement with bf16 and the mean NLL over :data:`TEXTS`."""
    import torch

    agree = {name: 0 for name in models}
    nll = {name: 0.0 for name in models}
    positions = 0
    with torch.inference_mode():
        for text in TEXTS:
            ids = torch.tensor([tokenizer(text).input_ids])
            targets = ids[0, 1:]
            reference = None
            for name, loaded in models.items():
                logits = loaded.model(ids).logits[0, :-1].float()
                top = logits.argmax(-1)
                reference = top if reference is None else reference
                agree[name] += int((top == reference).sum())
                nll[name] += float(
                    torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                )
            positions += len(targets)
    return {
        name: {"agreement": agree[name] / positions, "nll": nll[name] / positions}
        for name in models
    } | {"_positions": {"count": positions}}


def bench_quantize() -> dict:
    """Everything :func:`section` shows, measured on the demo model (about 5 minutes)."""
    import qwen_magic
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.backends.kernel.heavy_imports import import_heavy_modules
    from qwen_magic.options import GenerationOptions
    from qwen_magic.storage.cache_dir import cache_root

    def say(message: str) -> None:
        print(f"quantize: {message}", flush=True)

    import_heavy_modules()  # quietly: transformers imports torchao on the way

    say("memory bandwidth…")
    bandwidth = memory_bandwidth()
    first_ever = {}
    for fmt in FORMATS[1:]:
        for folder in (cache_root() / "quantized").glob(f"*-{fmt}-*"):
            if folder.name.startswith("Qwen2.5-Coder-0.5B-Instruct"):
                shutil.rmtree(folder, ignore_errors=True)
        say(f"first-ever {fmt} load (quantizing) in a new process…")
        first_ever[fmt] = run_json(LOAD_AND_REPLY.format(fmt=fmt, prompt=PROMPT, tokens=8))[
            "load_s"
        ]
    cached = {}
    for fmt in FORMATS:
        say(f"cached {fmt} load and first reply in a new process…")
        cached[fmt] = run_json(LOAD_AND_REPLY.format(fmt=fmt, prompt=PROMPT, tokens=NEW_TOKENS))

    say("decode speed, interleaved…")
    models = {
        fmt: qwen_magic.backends.kernel.loading.load_model(
            qwen_magic.backends.kernel.loading.model_spec("demo", quantize=fmt), progress=None
        )
        for fmt in FORMATS
    }
    messages = [{"role": "user", "content": PROMPT}]
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, do_sample=False)
    replies: dict[str, str] = {}
    speeds: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    for loaded in models.values():  # warm-up
        KernelBackend(loaded).start(messages, GenerationOptions(8, do_sample=False)).run()
    for _ in range(ROUNDS):
        for fmt, loaded in models.items():
            generation = KernelBackend(loaded).start(messages, options)
            replies[fmt] = generation.run()
            speeds[fmt].append(generation.stats.tokens_per_second)

    say("teacher-forced agreement and NLL…")
    quality = teacher_forced(models, models["none"].tokenizer)
    formats = {}
    for fmt, loaded in models.items():
        ratios = [q / b for q, b in zip(speeds[fmt], speeds["none"], strict=True)]
        read = bytes_per_token(loaded)
        tps = statistics.median(speeds[fmt])
        formats[fmt] = {
            "method": loaded.quantization_method or "bfloat16",
            "weights_gib": loaded.memory_bytes / 2**30,
            "bytes_per_token": read,
            "bound_tps": bandwidth / read,
            "tokens_per_s": tps,
            "bound_fraction": tps / (bandwidth / read),
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "first_ever_load_s": first_ever.get(fmt),
            "cached_load_s": cached[fmt]["load_s"],
            "first_reply_s": cached[fmt]["first_reply_s"],
            "peak_rss_gib": cached[fmt]["peak_rss"] / 2**30,
            "reply": replies[fmt],
            **quality[fmt],
        }
    del models

    say("torchao's own int8 path: eager, and compiled with a static cache (compiling)…")
    torchao_int8 = run_json(TORCHAO_INT8.format(prompt=PROMPT, tokens=NEW_TOKENS, rounds=3))
    compiled_ratios = [c / p for p, c in torchao_int8["pairs"]]
    return {
        "bandwidth_gbs": bandwidth / 1e9,
        "positions": quality["_positions"]["count"],
        "formats": formats,
        "torchao_int8": {
            "eager_ratio": torchao_int8["eager_tps"] / torchao_int8["eager_bf16_tps"],
            "eager_tps": torchao_int8["eager_tps"],
            "compiled_first_reply_s": torchao_int8["compiled_first_reply_s"],
            "compiled_ratio": statistics.median(compiled_ratios),
            "compiled_range": [min(compiled_ratios), max(compiled_ratios)],
            "compiled_tps": statistics.median(c for _p, c in torchao_int8["pairs"]),
        },
    }


HEADING = "`--quantize` on this CPU"


def section(result: dict) -> str:
    """The ``## `--quantize` on this CPU`` section of BENCHMARKS.md."""
    formats = result["formats"]
    label = {"none": "none (bf16)", "int8": "int8", "int4": "int4"}
    int8, int4 = formats["int8"], formats["int4"]
    alt = result["torchao_int8"]

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def ratio(fmt: str) -> str:
        low, high = formats[fmt]["ratio_range"]
        return f"{formats[fmt]['ratio']:.2f}× ({low:.2f}–{high:.2f})"

    lines = [
        f"## {HEADING}",
        "",
        f'`%qwen_load demo --quantize FORMAT`; greedy replies to "{PROMPT}" '
        f"({NEW_TOKENS} new tokens at most) through the `%%qwen` path, the three models in one "
        f"process, interleaved, {ROUNDS} rounds; × bf16 is the median of the rounds' ratios "
        "(range in brackets: the machine is shared, and the spread is the noise). Quality: "
        f"teacher-forced over {result['positions']} token positions of six fixed texts "
        "(`benchmarks/quantization.py`).",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| int4 decode ≥ 2.5× bf16 | {ratio('int4')} | {mark(int4['ratio'] >= 2.5)} |",
        f"| int8 decode ≥ 1.5× bf16 | {ratio('int8')} | {mark(int8['ratio'] >= 1.5)} |",
        "",
        "| format | kernel | decode tokens/s | × bf16 | bound tokens/s | of the bound "
        "| top-1 agreement with bf16 | NLL |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {label[fmt]} | {row['method']} | {row['tokens_per_s']:.1f} | {ratio(fmt)} "
            f"| {row['bound_tps']:.0f} | {row['bound_fraction']:.0%} | {row['agreement']:.1%} "
            f"| {row['nll']:.4f} |"
            for fmt, row in formats.items()
        ],
        "",
        "| format | first-ever load (quantizing; s) | cached load, new process (s) "
        "| first reply (s) | peak RSS (GiB) | weights (GiB) | read per token (GiB) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {label[fmt]} | "
            + ("–" if row["first_ever_load_s"] is None else f"{row['first_ever_load_s']:.1f}")
            + f" | {row['cached_load_s']:.1f} | {row['first_reply_s']:.1f} "
            f"| {row['peak_rss_gib']:.2f} | {row['weights_gib']:.2f} "
            f"| {row['bytes_per_token'] / 2**30:.2f} |"
            for fmt, row in formats.items()
        ],
        "",
        f"Memory read bandwidth, measured in this run: {result['bandwidth_gbs']:.0f} GB/s "
        "(`torch.sum` over 1 GiB, best of 5); a format's bound is that over the bytes one token "
        "reads (all weights but the embedding table). Loads include the imports; the first "
        "reply includes nothing compiled (both kernels run eagerly).",
        "",
        "The int8 alternative, torchao's own int8 weight-only path (same process as a bf16 "
        f"model): eager {alt['eager_ratio']:.2f}× bf16 ({alt['eager_tps']:.1f} tokens/s: it "
        "widens each weight to bf16 at every call); compiled with a static cache "
        "(`--fast` forced to compile on the CPU, torchao's recommended inductor settings) "
        f"{alt['compiled_ratio']:.2f}× "
        f"({alt['compiled_range'][0]:.2f}–{alt['compiled_range'][1]:.2f}; "
        f"{alt['compiled_tps']:.1f} tokens/s), with a first reply of "
        f"{alt['compiled_first_reply_s']:.0f} s (compiling). PyTorch's int8 kernel, above, needs "
        "no compiling, so `--quantize int8` uses it.",
        "",
        "Replies (greedy, first 80 characters):",
        "",
        *[f"- {label[fmt]}: {row['reply'][:80]!r}" for fmt, row in formats.items()],
        "",
    ]
    return "\n".join(lines)


def write_only_this_section(result: dict, report: Path) -> None:
    """Replace this section of ``report`` (the rest stays as the last full run wrote it)."""
    from benchmarks.common import replace_section
    from qwen_magic.storage.atomic import write_atomic

    write_atomic(report, replace_section(report.read_text(), HEADING, section(result)))
