"""GPU decode speed on Qwen2-7B-Instruct's shapes: plain generate, flash attention, ``--fast``.

Run ``make bench-gpu`` (or ``python benchmarks/gpu.py``) on a CUDA machine. It builds a
``Qwen2ForCausalLM`` from Qwen2-7B-Instruct's published config (hidden 3584, 28 layers, 28 heads,
4 KV heads, intermediate 18944, vocab 152064) with random bf16 weights made directly on the GPU:
the same shapes, so the same speed, and nothing to download. Then, greedy, with exactly
``--new-tokens`` tokens per reply (``min_new_tokens`` = ``max_new_tokens``), median of ``--runs``:

* plain ``model.generate`` with sdpa, and with flash_attention_2 where ``flash_attn`` imports;
* the ``%%qwen`` path (``qwen_magic.backends.kernel.reply.Generation``: streamer, worker thread);
* ``%%qwen --fast``: the static KV cache, which makes transformers compile the decoding step with
  ``torch.compile`` on CUDA; the compiling replies are timed apart, before the measured ones;
* a ``--fast`` follow-up turn, whose prompt prefix is reused from the static cache.

It prints a table and replaces the ``## GPU`` section of ``BENCHMARKS.md`` (the rest of the file
is left as it is), only when run on CUDA. ``--out DIR`` (default: ``$OUT`` where set) also
writes the updated ``BENCHMARKS.md``, the section and the raw numbers there.

``--smoke`` runs the same code on the CPU with a tiny config in a few seconds and prints the
table without touching ``BENCHMARKS.md`` (``--out`` gets the section and the raw numbers): a
check that the script works, not a measurement. ``--compile-on-cpu`` adds transformers' own
testing switch that compiles ``--fast``'s decoding step on the CPU too, so the smoke test goes
through ``torch.compile`` as the GPU run does (the test suite runs it this way).

On the lent GPU machines (python3 with torch and transformers, no IPython, no network): run
``make gpu-wheels`` here first, so that the transformers version the tests use travels along in
``build/gpu-wheels`` (``make bench-gpu`` installs it into ``build/gpu-site``), then, there::

    make bench-gpu                        # or, without make:
    python3 -m pip install -q --no-index --no-deps --target build/gpu-site build/gpu-wheels/*.whl
    PYTHONPATH=build/gpu-site PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT

and copy ``$OUT/BENCHMARKS.md`` back over ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    machine_facts,
    replace_section,
    say,
    timed,
)
from qwen_magic.testing.models import compile_on_any_device  # noqa: E402  (no IPython needed)

#: Qwen2-7B-Instruct's config.json, the parts that decide the speed.
QWEN2_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
#: ``--smoke``: the same architecture at toy size, for a few seconds on a CPU.
SMOKE = {
    **QWEN2_7B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
}
QWEN_REFERENCE_TPS = 38.0  # Qwen's published transformers figure: A100, bf16, flash attention
H100_BOUND_TPS = 220.0  # H100 memory bandwidth (3.35 TB/s) over 7.6B bf16 weights
GOAL_TPS = 100.0  # the goal for fast mode
SYSTEM = "You are a helpful assistant."
PARAGRAPH = (
    "Explain, step by step and with examples, how a hash table works: hashing, buckets, "
    "collisions, open addressing against chaining, load factors and resizing, and what each "
    "choice costs in time and memory. "
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU; no writing")
    parser.add_argument("--new-tokens", type=int, default=None, help="per reply (256; smoke 12)")
    parser.add_argument("--runs", type=int, default=None, help="measured runs per row (3; 2)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="about this long a prompt")
    parser.add_argument("--synthetic-tokenizer", action="store_true", help="never the demo's")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write results here")
    parser.add_argument(
        "--compile-on-cpu", action="store_true", help="with --smoke: compile --fast on the CPU"
    )
    args = parser.parse_args(argv)
    if args.compile_on_cpu and not args.smoke:
        parser.error("--compile-on-cpu goes with --smoke (on CUDA, --fast compiles anyway)")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "No CUDA device: this benchmark measures a GPU. Run it on a CUDA machine "
            "(make bench-gpu), or with --smoke to check the script here.",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.smoke else "cuda"
    new_tokens = args.new_tokens or (12 if args.smoke else 256)
    runs = args.runs or (2 if args.smoke else 3)
    started = time.perf_counter()

    facts = machine_facts(device)
    say(f"machine: {facts}")
    shapes = SMOKE if args.smoke else QWEN2_7B
    model, build_seconds = build_model(shapes, device)
    if args.compile_on_cpu:
        model.generation_config.compile_config = compile_on_any_device()
    tokenizer, tokenizer_source = load_tokenizer(shapes["vocab_size"], args.synthetic_tokenizer)
    synthetic = tokenizer_source.startswith("synthetic")
    loaded = make_loaded(model, tokenizer, device)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user_message(tokenizer, args.prompt_tokens, synthetic)},
    ]
    from qwen_magic.backends.kernel.encoding import encode

    prompt_ids = encode(tokenizer, messages)
    prompt_tokens = len(prompt_ids)
    facts.update(
        parameters=f"{loaded.parameters / 1e9:.2f}B",
        weights=f"{weight_bytes(model) / 2**30:.2f} GiB",
        build=f"{build_seconds:.1f} s",
        tokenizer=tokenizer_source,
        **{"prompt tokens": str(prompt_tokens)},
    )
    if device == "cuda":
        bandwidth = copy_bandwidth()
        facts["copy bandwidth"] = f"{bandwidth / 1e12:.2f} TB/s (read + write)"
        facts["bound at that bandwidth"] = f"{bandwidth / weight_bytes(model):.0f} tokens/s"
    say(f"model: {facts['parameters']} parameters, {facts['weights']}, built in {facts['build']}")

    bench = Bench(loaded, messages, prompt_ids, new_tokens, runs, device)
    flash = flash_status(device)
    bench.row("plain generate", "sdpa", bench.bare)
    if flash is None:
        bench.use_attention("flash_attention_2")
        bench.row("plain generate", "flash_attention_2", bench.bare)
        bench.use_attention("sdpa")
    else:
        bench.skipped("plain generate", "flash_attention_2", flash)
    bench.row("%%qwen (streamer, worker thread)", "sdpa", bench.magic(fast=False))
    bench.row("%%qwen --fast (static cache + compile)", "sdpa", bench.magic(fast=True), warmups=2)
    bench.row("%%qwen --fast, follow-up turn", "sdpa", bench.follow_up, warmups=1)
    if flash is None:
        bench.use_attention("flash_attention_2")
        fast_flash = bench.magic(fast=True)
        bench.row("%%qwen --fast (static cache + compile)", "flash_attention_2", fast_flash, 2)
        bench.use_attention("sdpa")
    else:
        bench.skipped("%%qwen --fast (static cache + compile)", "flash_attention_2", flash)

    facts["total time"] = f"{time.perf_counter() - started:.0f} s"
    section = render_section(facts, bench, new_tokens, runs, smoke=args.smoke)
    print()
    print(section)
    path = ROOT / "BENCHMARKS.md"
    measured = device == "cuda" and not args.smoke
    if measured and not args.no_write:
        path.write_text(replace_section(path.read_text(), "GPU", section))
        say(f"wrote the GPU section of {path}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if measured and not args.no_write:
            (out / "BENCHMARKS.md").write_text(path.read_text())
        (out / "gpu_section.md").write_text(section)
        (out / "gpu_results.json").write_text(
            json.dumps({"facts": facts, "rows": bench.rows}, indent=2, default=str)
        )
        say(f"copied the results to {out}")
    return 0


# -- setting up ------------------------------------------------------------------------------


def flash_status(device: str) -> str | None:
    """None when flash_attention_2 can run here, else why not."""
    if device != "cuda":
        return "needs CUDA"
    if importlib.util.find_spec("flash_attn") is None:
        return "not installed"
    return None


def build_model(shapes: dict[str, Any], device: str) -> tuple[Any, float]:
    """A Qwen2ForCausalLM of these shapes, random bf16 weights made on ``device`` directly."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    started = time.perf_counter()
    config = Qwen2Config(**shapes, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.generation_config.pad_token_id = shapes["eos_token_id"]
    model.generation_config.eos_token_id = shapes["eos_token_id"]
    if device == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - started


def load_tokenizer(vocab_size: int, synthetic: bool) -> tuple[Any, str]:
    """The demo model's Qwen tokenizer when it is prepared here, else a synthetic one."""
    if not synthetic:
        try:
            from transformers import AutoTokenizer

            from qwen_magic.backends.kernel.demo_model import demo_dir

            folder = demo_dir()
            if (folder / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(folder), "the demo model's Qwen tokenizer"
        except Exception as error:  # no demo model here (e.g. a bare GPU image)
            say(f"no demo tokenizer ({type(error).__name__}: {error}); using a synthetic one")
    return synthetic_tokenizer(vocab_size), "synthetic: made-up words, a ChatML template"


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over ``vocab_size`` made-up words, with a ChatML template.

    The weights are random, so the words carry no meaning either way; what matters is that the
    prompt has a realistic length and that every id the model can produce decodes.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
    vocab = {f"w{i}": i for i in range(vocab_size - len(specials))}
    vocab.update({token: vocab_size - len(specials) + i for i, token in enumerate(specials)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return tokenizer


def user_message(tokenizer: Any, tokens: int, synthetic: bool) -> str:
    """A question of about ``tokens`` tokens."""
    if synthetic:
        import random

        words = random.Random(0).sample(range(100_000), max(tokens - 12, 1))
        return " ".join(f"w{word}" for word in words)
    text = PARAGRAPH
    while len(tokenizer(text)["input_ids"]) < tokens - 20:
        text += PARAGRAPH
    return text.strip()


def make_loaded(model: Any, tokenizer: Any, device: str) -> Any:
    from qwen_magic.backends.kernel.loading import LoadedModel, ModelSpec

    return LoadedModel(
        spec=ModelSpec("benchmark", dtype="bfloat16", device=device, attention="sdpa"),
        model=model,
        tokenizer=tokenizer,
        name="Qwen2-7B-Instruct shapes, random weights",
        source="benchmarks/gpu.py",
        dtype="bfloat16",
        devices=[device],
        attention="sdpa",
        parameters=model.num_parameters(),
        memory_bytes=weight_bytes(model),
        load_seconds=0.0,
    )


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth() -> float:
    """Device-to-device copy speed in bytes/s, counting bytes read and written."""
    import torch

    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del source, target
    torch.cuda.empty_cache()
    return 2 * 10 * 2**30 / seconds


# -- measuring -------------------------------------------------------------------------------


class Bench:
    """Runs the rows; each run returns a dict with first_token_s, tokens_per_s, tokens, ids."""

    def __init__(
        self,
        loaded: Any,
        messages: list[dict[str, str]],
        prompt_ids: list[int],
        new_tokens: int,
        runs: int,
        device: str,
    ) -> None:
        import torch

        from qwen_magic.backends.kernel.backend import KernelBackend

        self.loaded, self.messages = loaded, messages
        # One backend for every %%qwen row: its static cache (and compiled step) is kept.
        self.backend = KernelBackend(loaded)
        ids = torch.tensor([prompt_ids], device=loaded.device)
        self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.new_tokens, self.runs, self.device = new_tokens, runs, device
        self.rows: list[dict[str, Any]] = []
        self.reference_ids: list[int] | None = None
        # Every reply decodes exactly new_tokens tokens, also through qwen_magic's options.
        loaded.model.generation_config.min_new_tokens = new_tokens

    def use_attention(self, attention: str) -> None:
        self.loaded.model.set_attn_implementation(attention)
        self.loaded.attention = attention

    def skipped(self, mode: str, attention: str, why: str) -> None:
        self.rows.append({"mode": mode, "attention": attention, "note": why})
        say(f"{mode}, {attention}: {why}")

    def row(
        self, mode: str, attention: str, run: Callable[[], dict[str, Any]], warmups: int = 1
    ) -> None:
        import torch

        say(f"{mode}, {attention}: {warmups} warm-up + {self.runs} runs…")
        row: dict[str, Any] = {"mode": mode, "attention": attention}
        try:
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            graphs_before = compiled_graphs()
            row["warmup_seconds"] = [round(timed(run)[1], 2) for _ in range(warmups)]
            graphs_warm = compiled_graphs()
            results = [run() for _ in range(self.runs)]
            row["graphs_compiled_in_warmup"] = graphs_warm - graphs_before
            row["graphs_compiled_while_measured"] = compiled_graphs() - graphs_warm
            row["first_token_s"] = statistics.median(r["first_token_s"] for r in results)
            row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in results)
            row["tokens"] = sorted({r["tokens"] for r in results})
            row["all_tokens_per_s"] = [round(r["tokens_per_s"], 2) for r in results]
            if "cached" in results[0]:
                row["cached_prompt_tokens"] = results[0]["cached"]
            if self.device == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            ids = results[0].get("ids")
            if ids is not None and self.reference_ids is None:
                self.reference_ids = ids
            elif ids is not None:
                row["same_tokens_as_plain"] = common_prefix(ids, self.reference_ids)
            row["compiled"] = getattr(self.loaded.model, "_compiled_call", None) is not None
        except Exception as error:  # one broken row must not cost the whole (rare) GPU run
            traceback.print_exc()
            row["note"] = f"failed: {type(error).__name__}: {str(error).strip()[:160]}"
        self.rows.append(row)
        say(f"  {json.dumps(row, default=str)}")

    def bare(self) -> dict[str, Any]:
        """``model.generate`` as in Qwen's recipe, without streamer or thread; times each step."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []
        never = torch.zeros(1, dtype=torch.bool, device=self.inputs["input_ids"].device)

        class Stamp(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stamps.append(time.perf_counter())  # generate syncs each step: host time is fine
                return never

        self._sync()
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.loaded.model.generate(
                **self.inputs,
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                stopping_criteria=StoppingCriteriaList([Stamp()]),
            )
        self._sync()
        ids = output[0, self.inputs["input_ids"].shape[1] :].tolist()
        return {
            "first_token_s": stamps[0] - started,
            "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": len(ids),
            "ids": ids,
        }

    def magic(self, *, fast: bool) -> Callable[[], dict[str, Any]]:
        """A reply through qwen_magic's Generation, as ``%%qwen`` (with ``--fast``) makes it."""
        from qwen_magic.options import GenerationOptions

        options = GenerationOptions(max_new_tokens=self.new_tokens, do_sample=False, fast=fast)

        def run() -> dict[str, Any]:
            generation = self.backend.start(self.messages, options)
            generation.run()
            self._sync()
            return {
                "first_token_s": generation.stats.first_token_seconds,
                "tokens_per_s": generation.stats.tokens_per_second,
                "tokens": generation.stats.new_tokens,
                "ids": (generation._sequence or [])[generation.stats.prompt_tokens :],
            }

        return run

    def follow_up(self) -> dict[str, Any]:
        """Turn 2 of a ``--fast`` chat: its prompt prefix comes from the static cache."""
        from qwen_magic.chat import Chat
        from qwen_magic.conversation import ConversationBook
        from qwen_magic.options import GenerationOptions
        from qwen_magic.presentation import NullView

        options = GenerationOptions(max_new_tokens=self.new_tokens, do_sample=False, fast=True)
        chat = Chat(self.backend, ConversationBook(), reuse_cache=True)
        chat.book.default_system_prompt = SYSTEM
        chat.ask(self.messages[-1]["content"], options=options, view=NullView())
        turn = chat.ask("Now summarise that in three sentences.", options=options, view=NullView())
        self._sync()
        return {
            "first_token_s": turn.stats["first_token_seconds"],
            "tokens_per_s": turn.stats["tokens_per_second"],
            "tokens": turn.stats["new_tokens"],
            "cached": turn.stats["cached_prompt_tokens"],
        }

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def common_prefix(first: list[int], second: list[int] | None) -> str:
    from qwen_magic.backends.kernel.caches import shared_prefix_length

    return f"{shared_prefix_length(first, second or [])}/{len(first)}"


# -- reporting -------------------------------------------------------------------------------


def render_section(
    facts: dict[str, str], bench: Bench, new_tokens: int, runs: int, *, smoke: bool
) -> str:
    config = bench.loaded.model.config
    if smoke:
        where = "the CPU, as a smoke test of the script (`--smoke`: toy shapes, not a measurement)"
        shapes, same = "toy shapes", ""
    else:
        where, shapes = facts["GPU"], "Qwen2-7B-Instruct's shapes"
        same = ": the same shapes, so the same speed"
    lines = [
        "## GPU",
        "",
        f"Written by `make bench-gpu` (`benchmarks/gpu.py`) on {where}, "
        f"{time.strftime('%Y-%m-%d')}. Model: `Qwen2ForCausalLM` with {shapes} (hidden "
        f"{config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, "
        f"intermediate {config.intermediate_size}, vocab {config.vocab_size}; "
        f"{facts['parameters']} parameters, {facts['weights']}) with random bf16 weights{same}. "
        f"Prompt {facts['prompt tokens']} tokens ({facts['tokenizer']}); greedy, exactly "
        f"{new_tokens} new tokens per reply; median of {runs} runs after warm-up.",
        "",
        *[f"- {key}: {value}" for key, value in facts.items()],
        "",
        "| mode | attention | first token (s) | decode tokens/s "
        f"| × Qwen's {QWEN_REFERENCE_TPS:.0f} (A100) | of the H100 bound ({H100_BOUND_TPS:.0f}) "
        "| peak GPU memory (GiB) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in bench.rows:
        tps = row.get("tokens_per_s")
        if tps is None:
            lines.append(
                f"| {row['mode']} | {row['attention']} | – | – | – | – | – | {row['note']} |"
            )
            continue
        peak = f"{row['peak_gib']:.1f}" if "peak_gib" in row else "–"
        lines.append(
            f"| {row['mode']} | {row['attention']} | {row['first_token_s']:.3f} | {tps:.1f} "
            f"| {tps / QWEN_REFERENCE_TPS:.2f}× | {tps / H100_BOUND_TPS:.0%} | {peak} "
            f"| {row_note(row)} |"
        )
    fast = next(
        (
            row
            for row in bench.rows
            if row["mode"].startswith("%%qwen --fast (") and row.get("tokens_per_s")
        ),
        None,
    )
    lines.append("")
    if fast is not None and not smoke:
        met = "met" if fast["tokens_per_s"] >= GOAL_TPS else "**not met**"
        lines.append(
            f"Goal: `--fast` ≥ {GOAL_TPS:.0f} tokens/s — {fast['tokens_per_s']:.1f} tokens/s, "
            f"{met}. Its first replies took {', '.join(map(str, fast['warmup_seconds']))} s "
            "(compiling the decoding step; later replies reuse it)."
        )
        lines.append("")
    if ratios := speed_ratios(bench.rows):
        lines.append(f"Decode speed against plain `generate` (sdpa), same run: {ratios}.")
        lines.append("")
    lines.append(
        "Decode tokens/s counts the tokens after the first over the time after the first. The "
        f"reference points: Qwen's published transformers figure, about {QWEN_REFERENCE_TPS:.0f} "
        "tokens/s (A100, bf16, flash attention), and the H100's memory-bandwidth bound for 7.6B "
        f"bf16 weights, about {H100_BOUND_TPS:.0f} tokens/s (every token reads every weight once)."
    )
    lines.append("")
    return "\n".join(lines)


def speed_ratios(rows: list[dict[str, Any]]) -> str:
    """Each measured row's decode speed over plain sdpa generate's, e.g. "`%%qwen …`: 0.98×"."""
    plain = next(
        (r for r in rows if r["mode"] == "plain generate" and r["attention"] == "sdpa"), None
    )
    if plain is None or not plain.get("tokens_per_s"):
        return ""
    return "; ".join(
        f"{row['mode']} ({row['attention']}) {row['tokens_per_s'] / plain['tokens_per_s']:.2f}×"
        for row in rows
        if row is not plain and row.get("tokens_per_s")
    )


def row_note(row: dict[str, Any]) -> str:
    notes = []
    if len(row.get("tokens", [])) != 1:
        notes.append(f"tokens per run {row.get('tokens')}")
    if row.get("warmup_seconds") and "--fast" in row["mode"] and "follow-up" not in row["mode"]:
        notes.append(f"warm-up replies {', '.join(map(str, row['warmup_seconds']))} s")
        notes.append("compiled" if row.get("compiled") else "not compiled")
    if row.get("graphs_compiled_while_measured"):
        notes.append(f"**recompiled {row['graphs_compiled_while_measured']}× while measured**")
    if "cached_prompt_tokens" in row:
        notes.append(f"{row['cached_prompt_tokens']} prompt tokens reused")
    if "same_tokens_as_plain" in row:
        notes.append(f"first {row['same_tokens_as_plain']} tokens as plain sdpa")
    if "note" in row:
        notes.append(row["note"])
    return "; ".join(notes)


if __name__ == "__main__":
    sys.exit(main())
