"""What :class:`~qwen_magic.backends.server.ServerBackend` costs on top of a bare ``openai`` stream.

The backend reads the server's stream on a worker thread and hands the pieces to the caller's
thread through a queue (so a Stop click and Ctrl-C work while the server is quiet). This
measures what that costs, against the same request streamed with a bare ``openai`` client:

* decode speed, tokens/s after the first token (the goal: the backend's at least 0.97 of the
  bare client's, as the median of per-pair ratios);
* time to first token (the goal: the backend's at most 30 ms more, as the median of per-pair
  differences).

The two sides run interleaved, in alternating order, pair after pair (5 by default), because
the machines are shared and noisy; a warm-up request comes first. Run it as::

    python benchmarks/server.py                       # its own transformers serve on the demo model
    python benchmarks/server.py --url http://host:8000  # a server that is already running
    python benchmarks/server.py --synthetic           # a stand-in server with a steady pace

On a shared, busy CPU the model's own speed swings far more than the client's overhead, so
``--synthetic`` also measures against :func:`synthetic_server`: a small local HTTP server that
streams canned SSE chunks at a fixed pace (no model), which leaves only the client side to vary.
It prints a Markdown section (it does not edit BENCHMARKS.md). :func:`measure` is the part to
call from other code.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_magic.backends.server import TRANSFORMERS_SERVE, ServerBackend  # noqa: E402
from qwen_magic.options import GenerationOptions  # noqa: E402

PROMPT = "Write a short paragraph about why unit tests matter."
NEW_TOKENS = 64
PAIRS = 5
DECODE_GOAL = 0.97
TTFT_GOAL_SECONDS = 0.030


@contextlib.contextmanager
def synthetic_server(
    tokens_per_second: float = 50.0, first_token_seconds: float = 0.2
) -> Iterator[str]:
    """A stand-in chat server on a loopback port, streaming canned pieces at a steady pace.

    It answers ``GET /v1/models`` (one model) and streamed ``POST /v1/chat/completions``: the
    role chunk at once, the first piece after ``first_token_seconds``, then ``max_tokens``
    pieces in all at ``tokens_per_second``, a finish chunk and usage, over HTTP/1.1 chunked
    encoding (the connection is kept, as with a real server). Yields its base URL.
    """

    def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {"id": "s", "object": "chat.completion.chunk", "created": 0, "model": "synthetic"}
        body.update(choices=choices, **({"usage": usage} if usage else {}))
        return f"data: {json.dumps(body)}\n\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def send_chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def do_GET(self) -> None:
            data = {"object": "list", "data": [{"id": "synthetic", "object": "model"}]}
            payload = json.dumps({**data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            tokens = int(body.get("max_tokens") or 16)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self.send_chunk(event({"role": "assistant", "content": ""}))
                time.sleep(first_token_seconds)
                for index in range(tokens):
                    if index:
                        time.sleep(1 / tokens_per_second)
                    self.send_chunk(event({"content": f" w{index}"}))
                usage = {"prompt_tokens": 30, "completion_tokens": tokens}
                self.send_chunk(event({}, finish="length"))
                self.send_chunk(event(None, usage={**usage, "total_tokens": tokens + 30}))
                self.send_chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def bare_stream(client: Any, fields: dict[str, Any]) -> tuple[float, float, str]:
    """One streamed request with the bare ``openai`` client: (TTFT s, decode tokens/s, text).

    Decode speed is measured as :class:`~qwen_magic.backends.base.ReplyStats` does: tokens after the
    first over the time after the first, tokens from the server's usage when it sends it.
    """
    started = time.perf_counter()
    first = None
    pieces: list[str] = []
    usage = None
    for chunk in client.chat.completions.create(**fields):
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter() - started
                pieces.append(choice.delta.content)
    total = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the server sent no text")
    tokens = usage.completion_tokens if usage is not None else len(pieces)
    return first, (tokens - 1) / (total - first), "".join(pieces)


def backend_stream(
    backend: ServerBackend, messages: list[dict[str, str]], options: GenerationOptions
) -> tuple[float, float, str]:
    """The same request through ``ServerBackend.start(...)``: (TTFT s, decode tokens/s, text)."""
    reply = backend.start(messages, options)
    for _piece in reply:
        pass
    if reply.stats.first_token_seconds is None:
        raise RuntimeError("the server sent no text")
    return reply.stats.first_token_seconds, reply.stats.tokens_per_second, reply.text


def measure(
    url: str,
    *,
    pairs: int = PAIRS,
    new_tokens: int = NEW_TOKENS,
    prompt: str = PROMPT,
    model: str | None = None,
) -> dict[str, Any]:
    """Interleaved pairs of bare-client and ``ServerBackend`` replies to one greedy request on
    the server at ``url``; returns every pair's figures and the medians of their comparisons."""
    import openai

    backend = ServerBackend.connect(url, model, progress=None)
    client = openai.OpenAI(base_url=backend.base_url, api_key="EMPTY", max_retries=0)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt},
    ]
    options = GenerationOptions(max_new_tokens=new_tokens, do_sample=False)
    fields: dict[str, Any] = {
        "model": backend.model_id,
        "messages": messages,
        "stream": True,
        "max_tokens": new_tokens,
        "temperature": 0.0,
    }
    if backend.server_kind != TRANSFORMERS_SERVE:  # the backend asks for usage the same way
        fields["stream_options"] = {"include_usage": True}
    load_before = os.getloadavg()[0]
    try:
        bare_stream(client, fields)  # warm-up: first-request costs on the server and here
        backend_stream(backend, messages, options)
        rows = []
        for index in range(pairs):
            if index % 2 == 0:
                bare = bare_stream(client, fields)
                ours = backend_stream(backend, messages, options)
            else:
                ours = backend_stream(backend, messages, options)
                bare = bare_stream(client, fields)
            rows.append(
                {
                    "bare_ttft_s": bare[0],
                    "bare_tokens_per_s": bare[1],
                    "backend_ttft_s": ours[0],
                    "backend_tokens_per_s": ours[1],
                    "same_text": bare[2] == ours[2],
                }
            )
    finally:
        client.close()
        backend.close()
    ratios = [row["backend_tokens_per_s"] / row["bare_tokens_per_s"] for row in rows]
    overheads = [row["backend_ttft_s"] - row["bare_ttft_s"] for row in rows]
    return {
        "url": backend.base_url,
        "server": backend.server_kind,
        "model": backend.name,
        "pairs": rows,
        "new_tokens": new_tokens,
        "decode_ratio_median": statistics.median(ratios),
        "decode_ratio_range": (min(ratios), max(ratios)),
        "ttft_overhead_median_s": statistics.median(overheads),
        "ttft_overhead_range_s": (min(overheads), max(overheads)),
        "bare_tokens_per_s_median": statistics.median(r["bare_tokens_per_s"] for r in rows),
        "backend_tokens_per_s_median": statistics.median(r["backend_tokens_per_s"] for r in rows),
        "bare_ttft_median_s": statistics.median(r["bare_ttft_s"] for r in rows),
        "backend_ttft_median_s": statistics.median(r["backend_ttft_s"] for r in rows),
        "all_same_text": all(row["same_text"] for row in rows),
        # The machine's 1-minute load average before and after: above its core count, the
        # model's speed swings and the pairs compare noise.
        "load_average": (load_before, os.getloadavg()[0]),
        "cpu_count": os.cpu_count(),
    }


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown section."""
    import openai

    ratio, (low, high) = result["decode_ratio_median"], result["decode_ratio_range"]
    overhead_ms = 1000 * result["ttft_overhead_median_s"]
    o_low, o_high = (1000 * x for x in result["ttft_overhead_range_s"])
    ok = {True: "met", False: "**missed**"}
    lines = [
        f"## Server backend ({result['server']})",
        "",
        f"`python benchmarks/server.py` on {time.strftime('%Y-%m-%d')}: {result['model']} on "
        f"{result['server']} at {result['url']}, greedy, {result['new_tokens']} new tokens, "
        f"{len(result['pairs'])} interleaved pairs (bare `openai` {openai.__version__} stream "
        f"vs `ServerBackend.start`), Python {platform.python_version()}. Medians; ranges in "
        "brackets.",
        "",
        "| | bare `openai` stream | `ServerBackend` | comparison | goal |",
        "|---|---|---|---|---|",
        f"| decode tokens/s | {result['bare_tokens_per_s_median']:.2f} | "
        f"{result['backend_tokens_per_s_median']:.2f} | ratio {ratio:.3f} [{low:.3f}–{high:.3f}] "
        f"| ≥ {DECODE_GOAL} ({ok[ratio >= DECODE_GOAL]}) |",
        f"| time to first token | {result['bare_ttft_median_s']:.3f} s | "
        f"{result['backend_ttft_median_s']:.3f} s | {overhead_ms:+.1f} ms "
        f"[{o_low:+.1f}–{o_high:+.1f}] | ≤ {1000 * TTFT_GOAL_SECONDS:.0f} ms "
        f"({ok[overhead_ms <= 1000 * TTFT_GOAL_SECONDS]}) |",
        "",
        f"Same text from both sides in every pair: {'yes' if result['all_same_text'] else 'no'}. "
        f"Load average {result['load_average'][0]:.1f} before, {result['load_average'][1]:.1f} "
        f"after, on {result['cpu_count']} cores.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start transformers serve)")
    parser.add_argument(
        "--synthetic", action="store_true", help="measure against a steady stand-in server too"
    )
    parser.add_argument("--model", help="the served model to use (default: the only one)")
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)

    if args.synthetic:
        with synthetic_server() as synthetic_url:
            steady = measure(synthetic_url, pairs=args.pairs, new_tokens=args.new_tokens)
        steady["server"] = "a steady stand-in server, no model"
        print(markdown(steady))
        print()
    server = None
    url = args.url
    if url is None:
        from qwen_magic.backends.kernel.demo_model import ensure_demo_model
        from qwen_magic.testing.serving import ServeProcess, serve_missing

        if why := serve_missing():
            print(f"Cannot start transformers serve: {why}", file=sys.stderr)
            return 2
        log = Path(tempfile.mkdtemp(prefix="qwen-magic-bench-")) / "serve.log"
        server = ServeProcess(ensure_demo_model(progress=lambda message: None), log).start()
        url = server.url
    try:
        result = measure(url, pairs=args.pairs, new_tokens=args.new_tokens, model=args.model)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
