"""The GPU benchmark's script, run here as its ``--smoke`` test so it works when a GPU comes.

``benchmarks/gpu.py`` only measures on CUDA, and GPU machines are rare: a script that broke
quietly would waste one. ``--smoke --compile-on-cpu`` runs every row with toy shapes on the CPU,
``--fast`` through ``torch.compile`` as on a GPU. The numbers mean nothing; the rows, the
compile counts and the prefix reuse are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.demo
@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_every_row(tmp_path, demo_path):
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_text()
    command = [sys.executable, "benchmarks/gpu.py", "--smoke", "--compile-on-cpu"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert benchmarks.read_text() == before  # a smoke run never rewrites the results

    rows = {
        (row["mode"], row["attention"]): row
        for row in json.loads((tmp_path / "gpu_results.json").read_text())["rows"]
    }
    for key, row in rows.items():
        assert "failed" not in row.get("note", ""), key
    assert rows["plain generate", "flash_attention_2"]["note"] == "needs CUDA"

    plain = rows["plain generate", "sdpa"]
    streamed = rows["%%qwen (streamer, worker thread)", "sdpa"]
    fast = rows["%%qwen --fast (static cache + compile)", "sdpa"]
    follow_up = rows["%%qwen --fast, follow-up turn", "sdpa"]
    for row in (plain, streamed, fast, follow_up):
        assert row["tokens"] == [12] and row["tokens_per_s"] > 0
    assert streamed["same_tokens_as_plain"] == "12/12"
    assert fast["compiled"] and fast["graphs_compiled_in_warmup"] == 1
    assert fast["graphs_compiled_while_measured"] == 0
    assert follow_up["graphs_compiled_in_warmup"] == 0  # a new chat reuses the compiled step
    assert follow_up["cached_prompt_tokens"] > 100  # turn 1's prompt and reply, from the cache

    section = (tmp_path / "gpu_section.md").read_text()
    assert section.startswith("## GPU") and "| %%qwen --fast, follow-up turn | sdpa |" in section


@pytest.mark.demo
@pytest.mark.slow
def test_gpu_benchmark_runs_without_ipython(tmp_path, demo_path):
    """The GPU machines' Python has torch and transformers but no IPython: the script still runs
    every row (it stands in for the one thing qwen_magic needs from IPython, UsageError)."""
    without_ipython = (
        "import runpy, sys\n"
        "sys.modules['IPython'] = None  # import IPython now fails, as on the GPU image\n"
        f"sys.argv = ['gpu.py', '--smoke', '--runs', '1', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_path('benchmarks/gpu.py', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", without_ipython],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_results.json").read_text())["rows"]
    measured = [row for row in rows if "tokens_per_s" in row]
    assert len(measured) == 4, rows  # plain, %%qwen, --fast, follow-up (flash needs CUDA)


@pytest.mark.skipif(torch.cuda.is_available(), reason="here it would measure the GPU")
def test_gpu_benchmark_refuses_to_measure_without_cuda():
    """Without --smoke on a machine without CUDA: a one-line reason and exit status 2."""
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--no-write"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "No CUDA device" in done.stderr and "--smoke" in done.stderr


def test_llama_cpp_section_is_skipped_with_a_note_where_it_is_not_installed(tmp_path, monkeypatch):
    """Without llama_cpp, ``--only llamacpp`` writes its section as a one-line note naming how
    to install it, and leaves the other sections of BENCHMARKS.md as they were."""
    import importlib.util

    sys.path.insert(0, str(ROOT))
    from benchmarks import speed

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a),
    )
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    speed.write_only_sections(["llamacpp"], report)
    text = report.read_text()
    assert "## Other\n\nkept\n" in text
    assert f"## {speed.LLAMA}\n\nSkipped in this run: llama_cpp is not importable" in text
    assert "pip install llama-cpp-python" in text and "`make llama-cpp`" in text


def _acting_result(steps: int, step2_ratios: list[float]) -> dict:
    """A result of ``benchmarks.acting.bench_acting`` as data (figures made up, shapes real)."""
    way = {
        "steps": [steps] * 3,
        "first_token_s": [2.5, 1.2][:steps],
        "prompt_tokens": [181, 240][:steps],
        "cached_tokens": [0, 200][:steps],
        "new_tokens": [20, 4][:steps],
        "wall_s": 9.0,
        "model_s": 8.9,
        "code_s": 0.002,
        "overhead_s": 0.01,
        "overhead_fraction": 0.001,
    }
    return {
        "ways": {"reuse": way, "no reuse": {**way, "cached_tokens": [0, 0][:steps]}},
        "prefill_alone_s": 1.0,
        "prefill_alone_runs": [1.0] * 3,
        "step2_ratio": sorted(step2_ratios)[len(step2_ratios) // 2] if step2_ratios else 0.0,
        "step2_ratios": step2_ratios,
        "per_round": [{"reuse": 1.2, "no reuse": 3.0, "alone": 1.0}] * 3,
        "fastest": {"step2": 1.1, "alone": 1.0},
        "same_answer": True,
        "answer": "586",
        "outputs": ["586"],
        "true_count": 586,
        "count_in_answer": True,
        "rounds": 3,
        "cpu": "Some CPU",
        "threads": 2,
        "load": "1.00, 1.00, 1.00 at the start, 1.00, 1.00, 1.00 at the end",
    }


def test_acting_section_says_whether_step_two_met_its_goal_and_keeps_the_others(tmp_path):
    """The acting section marks the step-2 goal met or not met from the median ratio, lists
    tokens per step, and replaces only its own section of BENCHMARKS.md."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import acting
    from benchmarks.common import replace_section

    met = acting.section(_acting_result(2, [1.1, 1.2, 1.25]))
    missed = acting.section(_acting_result(2, [1.2, 1.4, 1.5]))
    assert met.startswith(f"## {acting.HEADING}\n")
    assert "| 1.20× (median of each round's ratio, range 1.10–1.25;" in met
    assert met.split("\n| same steps")[0].endswith("| met |")
    assert missed.split("\n| same steps")[0].endswith("| **not met** |")
    assert "| 2 | 240 | 200 / 0 | 4 | 1.200 | 1.200 |" in met
    assert "| with reuse | 9.00 | 8.90 | 0.002 | 0.010 | 0.10 % |" in met
    assert "| 3 | 1.200 | 3.000 | 1.000 | 1.20× |" in met  # each round's step 2

    report = "# Benchmarks\n\n## Other\n\nkept\n"
    once = replace_section(report, acting.HEADING, met)
    twice = replace_section(once, acting.HEADING, missed)
    assert "## Other\n\nkept\n" in twice and twice.count(f"## {acting.HEADING}") == 1
    assert "**not met**" in twice


def test_acting_section_says_so_when_the_model_took_one_step():
    """Where the demo model answered without running code, the section says so instead of
    per-step figures."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import acting

    text = acting.section(_acting_result(1, []))
    assert "did not take two steps here" in text and "| goal |" not in text


def test_llama_cpp_section_compares_each_engine_with_qwen_int4_and_bf16():
    """The side-by-side table gives every engine's decode speed over %%qwen int4's and its
    time to first token over %%qwen bf16's, with the prompt tokens each engine read."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import speed

    def row(tps: float, first: float) -> dict:
        return {
            "tps": tps,
            "tps_range": (tps - 1, tps + 1),
            "first_s": first,
            "first_range": (first, first),
            "tokens": 64,
            "prompt_tokens": 1015,
            "text": "Unit tests matter.",
        }

    result = {
        "results": {
            "llama.cpp": row(30.0, 4.0),
            "%%qwen bf16": row(10.0, 2.0),
            "%%qwen int4": row(20.0, 2.2),
        },
        "threads": 2,
        "version": "0.3.36",
        "cpu": "Some CPU",
        "rounds": 3,
    }
    text = speed.llama_section(result)
    assert "| llama.cpp | 30.0 (29.0–31.0) | 1.50× | 1015 | 4.00 s (4.00–4.00) | 2.00× |" in text
    assert "| %%qwen int4 | 20.0 (19.0–21.0) | 1.00× | 1015 | 2.20 s (2.20–2.20) | 1.10× |" in text
    assert "Some CPU, 2 threads for every engine" in text


def test_prefill_section_shows_the_rounds_ratio_to_bf16_with_its_range():
    """Each Prefill cell gives the median time with its range and, beside it, the median of
    the rounds' own ratios to bf16 (not the ratio of the medians), with that range."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import speed

    result = {
        "tokens": {1000: 1005, 4000: 4041},
        "first_s": {"bf16|1000": 2.0, "int4|1000": 3.0, "bf16|4000": 9.0, "int4|4000": 9.0},
        "range": {"bf16|1000": (1.5, 2.5), "int4|1000": (2.0, 3.5)},
        "ratio": {"bf16|1000": 1.0, "int4|1000": 1.05, "bf16|4000": 1.0, "int4|4000": 0.98},
        "ratio_range": {"int4|1000": (0.95, 1.25)},
        "rounds": {1000: 6, 4000: 2},
        "cpu": "Some CPU",
    }
    text = speed.prefill_section(result)
    assert "| int4 | 3.00 s (2.00–3.50) | 1.05× (0.95–1.25) | 9.00 s | 0.98× |" in text
    assert "| int8 | – | – | – | – |" in text
