"""``make bench``'s Acting section: a two-step ``%%qwen --run`` turn, with and without cache reuse.

The question "How many rows of `sales` have an amount above 50?", over a seeded DataFrame,
makes the demo model write code (step 1), see the count, and answer with it (step 2). The turn
runs through the real acting loop (:class:`qwen_magic.agent.Agent`) on the in-kernel backend
in this process, with an approver that runs every step (``--yes`` without its line) and the
notebook's own :class:`~qwen_magic.notebook.code_runner.NotebookRunner` on an IPython
``InteractiveShell`` holding ``sales``, as ``%%qwen --run`` runs them (no widget: a
``NullView``). Measured in rounds, the two ways interleaved, medians:

* each step's time to first token with the conversation's KV cache reused (``Chat.reuse_cache``,
  the default) and without (every step reads its whole prompt);
* the prefill of step 2's new tokens alone, by a direct forward pass: the tokens step 2 does not
  find in the cache, read on top of a ``DynamicCache`` already holding the rest (built untimed),
  as the backend's own prefill calls the model. It is the least step 2 could cost with reuse;
  the goal is step 2's time to first token ≤ 1.3× it;
* the loop's own overhead: the turn's wall time minus the replies' time (each reply's
  ``total_seconds``) minus the code's run time, absolute and as a fraction of the turn;
* tokens per step (prompt, read from the cache, written), and whether both ways wrote the same
  steps and answer (greedy).

``python benchmarks/run.py --only acting`` runs it alone and replaces only its section.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_name, replace_section, say

HEADING = "Acting: time to first token per step"
QUESTION = "How many rows of `sales` have an amount above 50?"
#: The DataFrame the tests ask the demo model about (tests/test_acting.py), seeded the same.
SALES = (
    "import numpy as np, pandas as pd\n"
    "qm_rng = np.random.default_rng(7)\n"
    "sales = pd.DataFrame({'region': qm_rng.choice(['north', 'south', 'east', 'west'], 1234),\n"
    "                      'amount': qm_rng.uniform(0, 100, 1234).round(2)})\n"
)
NEW_TOKENS = 120
ROUNDS = 5
#: Step 2's time to first token with reuse, at most this many times its new tokens' prefill.
GOAL_RATIO = 1.3


class ApproveAll:
    """Runs every step's code, saying nothing (``--yes`` without its line)."""

    def decide(self, code: str, step: int) -> Any:
        from qwen_magic.agent import Decision

        return Decision("run")


class TimedRunner:
    """A code runner that notes how long each run took."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.seconds: list[float] = []

    def run(self, code: str) -> Any:
        started = time.perf_counter()
        result = self.runner.run(code)
        self.seconds.append(time.perf_counter() - started)
        return result


class RecordingBackend:
    """The backend, keeping each reply's prompt (to time step 2's new tokens alone)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.prompts: list[list[Any]] = []

    def start(self, messages: Any, options: Any, *, conversation: Any = None) -> Any:
        self.prompts.append(list(messages))
        return self.backend.start(messages, options, conversation=conversation)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def seeded_shell() -> Any:
    """An IPython shell whose namespace holds ``sales``."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell(SALES, store_history=False)
    return shell


def one_turn(loaded: Any, shell: Any, reuse: bool) -> dict[str, Any]:
    """The question asked once, on a new backend (no cache from an earlier round)."""
    from qwen_magic.agent import Agent
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook
    from qwen_magic.notebook.code_runner import NotebookRunner
    from qwen_magic.notebook.variables import summarize
    from qwen_magic.options import GenerationOptions
    from qwen_magic.presentation import NullView

    backend = RecordingBackend(KernelBackend(loaded))
    chat = Chat(backend, ConversationBook(), reuse_cache=reuse)  # type: ignore[arg-type]
    runner = TimedRunner(NotebookRunner(shell, show=False))
    agent = Agent(chat, ApproveAll(), runner)
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, do_sample=False)
    started = time.perf_counter()
    variables = summarize(shell.user_ns, hidden=getattr(shell, "user_ns_hidden", {}) or {})
    turn = agent.ask(QUESTION, options=options, variables=variables, view=NullView())
    wall = time.perf_counter() - started
    replies = [step["stats"] for step in turn.steps] + [turn.stats]
    model_s = sum(reply["total_seconds"] for reply in replies)
    code_s = sum(runner.seconds)
    return {
        "wall_s": wall,
        "model_s": model_s,
        "code_s": code_s,
        "overhead_s": wall - model_s - code_s,
        "first_token_s": [reply["first_token_seconds"] for reply in replies],
        "prompt_tokens": [reply["prompt_tokens"] for reply in replies],
        "cached_tokens": [reply["cached_prompt_tokens"] for reply in replies],
        "new_tokens": [reply["new_tokens"] for reply in replies],
        "texts": [step["text"] for step in turn.steps] + [turn.assistant],
        "outputs": [step["output"] for step in turn.steps],
        "answer": turn.assistant,
        "prompt_ids": [backend.encoder.token_ids(prompt) for prompt in backend.prompts],
    }


def prefill_alone(loaded: Any, prompt_ids: list[int], cached: int) -> float:
    """Seconds of one forward pass over ``prompt_ids[cached:]`` on top of a cache holding the
    first ``cached`` ids (built untimed), the way the backend's prefill calls the model."""
    import torch

    from qwen_magic.backends.kernel.caches import new_dynamic_cache
    from qwen_magic.backends.kernel.openmp import release_thread_team
    from qwen_magic.backends.kernel.prefill import cache_argument

    model = loaded.model
    ids = torch.tensor([prompt_ids], device=loaded.device)
    cache = new_dynamic_cache(model.config)

    def forward(start: int, stop: int) -> None:
        positions = torch.arange(start, stop, device=ids.device).unsqueeze(0)
        logits = model(
            input_ids=ids[:, start:stop],
            attention_mask=torch.ones_like(ids[:, :stop]),
            position_ids=positions,
            cache_position=positions[0],
            use_cache=True,
            logits_to_keep=1,
            **{cache_argument(): cache},
        ).logits
        logits[0, -1].argmax().item()  # the first token is chosen, as generate would

    try:
        with torch.inference_mode():
            forward(0, cached)
            started = time.perf_counter()
            forward(cached, len(prompt_ids))
            return time.perf_counter() - started
    finally:
        release_thread_team()  # the next reply's worker finds no other team (openmp.py)


def bench_acting() -> dict[str, Any]:
    """Rounds of the turn with reuse and without (the order alternating), step 2's new tokens'
    prefill alone timed right after the turn with reuse, so a slow spell hits both."""
    import qwen_magic

    load_before = _load_average()
    loaded = qwen_magic.load("demo", progress=None)
    shell = seeded_shell()
    true_count = int(shell.ev("int((sales['amount'] > 50).sum())"))
    say("acting: warm-up turn…")
    one_turn(loaded, shell, reuse=True)
    runs: dict[str, list[dict[str, Any]]] = {"reuse": [], "no reuse": []}
    alone: list[float] = []
    for number in range(ROUNDS):
        order = ("reuse", "no reuse") if number % 2 == 0 else ("no reuse", "reuse")
        for label in order:
            say(f"acting: round {number + 1}, {label}…")
            turn = one_turn(loaded, shell, reuse=label == "reuse")
            runs[label].append(turn)
            if label == "reuse" and len(turn["prompt_ids"]) >= 2:
                ids, cached = turn["prompt_ids"][1], turn["cached_tokens"][1]
                turn["prefill_alone_s"] = prefill_alone(loaded, ids, cached)
                alone.append(turn["prefill_alone_s"])
    result = summarize_runs(runs, alone, true_count)
    result["load"] = f"{load_before} at the start, {_load_average()} at the end"
    return result


def summarize_runs(
    runs: dict[str, list[dict[str, Any]]], alone: list[float], true_count: int
) -> dict[str, Any]:
    """Medians per way and step, from the rounds' turns; step 2 against its prefill alone as
    the median of each round's ratio."""

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    ways: dict[str, dict[str, Any]] = {}
    for label, turns in runs.items():
        steps = min(len(turn["first_token_s"]) for turn in turns)
        ways[label] = {
            "steps": [len(turn["first_token_s"]) for turn in turns],
            "first_token_s": [median([t["first_token_s"][i] for t in turns]) for i in range(steps)],
            "prompt_tokens": turns[-1]["prompt_tokens"],
            "cached_tokens": turns[-1]["cached_tokens"],
            "new_tokens": turns[-1]["new_tokens"],
            **{
                key: median([turn[key] for turn in turns])
                for key in ("wall_s", "model_s", "code_s", "overhead_s")
            },
            "overhead_fraction": median([turn["overhead_s"] / turn["wall_s"] for turn in turns]),
        }
    two_step_turns = [turn for turn in runs["reuse"] if len(turn["first_token_s"]) >= 2]
    ratios = [
        turn["first_token_s"][1] / seconds
        for turn, seconds in zip(two_step_turns, alone, strict=False)
        if seconds > 0
    ]

    def step2(turn: dict[str, Any]) -> float | None:
        return turn["first_token_s"][1] if len(turn["first_token_s"]) >= 2 else None

    per_round = [
        {"reuse": step2(reused), "no reuse": step2(plain), "alone": reused.get("prefill_alone_s")}
        for reused, plain in zip(runs["reuse"], runs["no reuse"], strict=False)
    ]
    fastest_step2 = min((s for s in map(step2, runs["reuse"]) if s is not None), default=0.0)
    texts = {label: [turn["texts"] for turn in turns] for label, turns in runs.items()}
    first = runs["reuse"][0]
    return {
        "ways": ways,
        "prefill_alone_s": median(alone),
        "prefill_alone_runs": alone,
        "step2_ratio": median(ratios),
        "step2_ratios": ratios,
        "per_round": per_round,
        "fastest": {"step2": fastest_step2, "alone": min(alone, default=0.0)},
        "same_answer": all(t == texts["reuse"][0] for ts in texts.values() for t in ts),
        "answer": first["answer"],
        "outputs": first["outputs"],
        "true_count": true_count,
        "count_in_answer": str(true_count) in first["answer"],
        "rounds": len(runs["reuse"]),
        "cpu": cpu_name(),
        "threads": _threads(),
        "load": _load_average(),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _load_average() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


# -- the section --------------------------------------------------------------------------------


def section(result: dict[str, Any]) -> str:
    """The section's Markdown, from :func:`bench_acting`'s result."""
    reuse, plain = result["ways"]["reuse"], result["ways"]["no reuse"]
    alone = result["prefill_alone_s"]
    two_steps = len(reuse["first_token_s"]) >= 2 and len(plain["first_token_s"]) >= 2
    lines = [
        f"## {HEADING}",
        "",
        f'`%%qwen --run` on "{QUESTION}" (a seeded 1,234-row DataFrame), greedy, {NEW_TOKENS} '
        f"new tokens at most, through the real acting loop (`Agent`), the in-kernel backend in "
        "the benchmark's process, every step approved, the code run by the notebook's "
        f"`NotebookRunner` on an IPython shell. {result['cpu']}, {result['threads']} threads, "
        f"load average (1, 5, 15 min) {result['load']}: the machine was shared with other "
        "developers' work, so absolute times vary from run to run and the figures of one round "
        "compare best. "
        f"Median of {result['rounds']} rounds, each running the turn with the conversation's KV "
        "cache reused and without it (the order alternating) after one warm-up turn; right after "
        "the turn with reuse, step 2's new tokens' prefill alone: one forward pass over just the "
        "prompt tokens step 2 did not find in the cache, on top of a cache holding the rest "
        "(built untimed), the way the backend's prefill calls the model (a direct measurement, "
        "not a difference of two timings).",
        "",
    ]
    if not two_steps:
        lines += [
            f"The demo model did not take two steps here (steps per turn, with reuse: "
            f"{reuse['steps']}, without: {plain['steps']}): no per-step figures.",
            "",
        ]
        return "\n".join(lines)
    step2, step2_plain = reuse["first_token_s"][1], plain["first_token_s"][1]
    ratio, ratios, fastest = result["step2_ratio"], result["step2_ratios"], result["fastest"]
    met = "met" if ratio <= GOAL_RATIO else "**not met**"
    spread = f"range {min(ratios):.2f}–{max(ratios):.2f}; " if ratios else ""
    new_step2 = reuse["prompt_tokens"][1] - reuse["cached_tokens"][1]
    lines += [
        "| goal | measured | |",
        "|---|---|---|",
        f"| step 2's time to first token with reuse ≤ {GOAL_RATIO}× the prefill of its new "
        f"tokens alone | {ratio:.2f}× (median of each round's ratio, {spread}medians "
        f"{step2:.3f} s vs {alone:.3f} s for {new_step2} tokens; the fastest of each, "
        f"{fastest['step2']:.3f} vs {fastest['alone']:.3f} s, "
        f"{fastest['step2'] / fastest['alone'] if fastest['alone'] else 0:.2f}×) | {met} |",
        f"| same steps and answer with and without reuse | {result['same_answer']} "
        f"| {'met' if result['same_answer'] else '**not met**'} |",
        "",
        "| step | prompt tokens | from the cache (reuse / without) | written | "
        "first token with reuse (s) | without (s) |",
        "|---|---|---|---|---|---|",
    ]
    for index, seconds in enumerate(reuse["first_token_s"]):
        without = plain["first_token_s"][index] if index < len(plain["first_token_s"]) else None
        lines.append(
            f"| {index + 1} | {reuse['prompt_tokens'][index]} | "
            f"{reuse['cached_tokens'][index]} / {plain['cached_tokens'][index]} | "
            f"{reuse['new_tokens'][index]} | {seconds:.3f} | "
            f"{'–' if without is None else f'{without:.3f}'} |"
        )
    lines += [
        "",
        f"Step 2's first token with reuse: {step2:.3f} s, without: {step2_plain:.3f} s "
        f"(without takes {step2_plain / step2:.2f}× as long). Step 1 reads the same "
        f"{reuse['prompt_tokens'][0]} tokens both ways, so its two figures "
        f"({reuse['first_token_s'][0]:.3f} and {plain['first_token_s'][0]:.3f} s) gauge this "
        "run's noise; each round's figures for step 2 (the prefill alone timed right after the "
        "turn with reuse):",
        "",
        "| round | step 2's first token, reuse (s) | without (s) | new tokens' prefill alone (s) "
        "| reuse ÷ alone |",
        "|---|---|---|---|---|",
        *[
            f"| {number} | {_seconds(row['reuse'])} | {_seconds(row['no reuse'])} | "
            f"{_seconds(row['alone'])} | "
            + (f"{row['reuse'] / row['alone']:.2f}×" if row["reuse"] and row["alone"] else "–")
            + " |"
            for number, row in enumerate(result["per_round"], start=1)
        ],
        "",
        f"The code's output shown to the model: {', '.join(map(repr, result['outputs']))} (the "
        f"true count is {result['true_count']}; "
        f"{'the answer holds it' if result['count_in_answer'] else 'the answer does not hold it'}"
        f"): {result['answer']!r}.",
        "",
        "The loop's own overhead: the turn's wall time minus the replies' time (each reply's "
        "`total_seconds`, from its start to its last token) minus the code's run time; it holds "
        "fitting the prompt, counting and encoding its tokens, the approval and recording.",
        "",
        "| | turn (s) | replies (s) | code (s) | loop overhead (s) | overhead, of the turn |",
        "|---|---|---|---|---|---|",
    ]
    for label, way in (("with reuse", reuse), ("without reuse", plain)):
        lines.append(
            f"| {label} | {way['wall_s']:.2f} | {way['model_s']:.2f} | {way['code_s']:.3f} | "
            f"{way['overhead_s']:.3f} | {100 * way['overhead_fraction']:.2f} % |"
        )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_only_this_section(report: Path) -> None:
    """Measure, then replace only this section of ``report`` (appended where it is missing)."""
    from qwen_magic.storage.atomic import write_atomic

    text = section(bench_acting())
    print(text)
    current = report.read_text() if report.exists() else ""
    write_atomic(report, replace_section(current, HEADING, text))
