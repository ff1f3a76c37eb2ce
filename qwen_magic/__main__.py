"""Command line: ``python -m qwen_magic COMMAND``.

``prepare-demo``
    Assemble, verify and convert the offline demo model into the cache (once).
``run-notebook PATH [--out OUT]``
    Execute a notebook headless (a real Jupyter kernel, as JupyterLab would run it) and print
    each ``%%qwen`` question with the reply the model gave. ``make demo`` runs the quickstart.
``chat [MODEL]``
    Chat in the terminal: each line you type is a turn; an empty line or Ctrl-D ends.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def prepare_demo() -> int:
    from qwen_magic.backends.kernel.demo_model import (
        DEMO_LICENSE,
        DEMO_NAME,
        demo_dir,
        ensure_demo_model,
        is_converted,
    )

    if is_converted(demo_dir()):
        print(f"The offline demo model {DEMO_NAME} is ready in {demo_dir()}.")
        return 0
    folder = ensure_demo_model()
    print(f"The offline demo model {DEMO_NAME} ({DEMO_LICENSE}) is ready in {folder}.")
    return 0


def run_notebook(path: str, out: str | None) -> int:
    import nbformat
    from nbclient import NotebookClient

    source = Path(path)
    notebook = nbformat.read(source, as_version=4)
    print(f"Running {source} in a headless Jupyter kernel…", flush=True)
    started = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=900,
        resources={"metadata": {"path": str(source.parent)}},
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no kernel start-up chatter
    ).execute()
    for cell in notebook.cells:
        if cell.cell_type != "code" or not cell.source.lstrip().startswith("%%qwen"):
            continue
        question = cell.source.split("\n", 1)[1].strip() if "\n" in cell.source else ""
        replies = [
            output["data"]["text/markdown"]
            for output in cell.get("outputs", [])
            if output.get("output_type") == "display_data" and "text/markdown" in output["data"]
        ]
        print(f"\n>>> {question}")
        for reply in replies:
            if reply.startswith("<sub>"):  # the footer line
                reply = f"[{reply.removeprefix('<sub>').removesuffix('</sub>')}]"
            print(reply)
    destination = Path(out) if out else Path("build") / source.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, destination)
    print(f"\nDone in {time.perf_counter() - started:.0f} s; executed notebook: {destination}")
    return 0


def chat(model: str | None) -> int:
    from qwen_magic import load
    from qwen_magic.chat import Chat

    print(load(model).summary())
    session = Chat()
    while True:
        try:
            message = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not message:
            return 0
        print("qwen> ", end="", flush=True)
        try:
            session.ask(message, view="text")
        except KeyboardInterrupt:
            print("\n(interrupted)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_magic", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare-demo", help="convert the offline demo model into the cache")
    runner = commands.add_parser("run-notebook", help="execute a notebook and print the chat")
    runner.add_argument("path")
    runner.add_argument("--out", default=None, help="where to save the executed notebook")
    talker = commands.add_parser("chat", help="chat in the terminal")
    talker.add_argument("model", nargs="?", default=None)
    args = parser.parse_args(argv)
    if args.command == "prepare-demo":
        return prepare_demo()
    if args.command == "run-notebook":
        return run_notebook(args.path, args.out)
    return chat(args.model)


if __name__ == "__main__":
    from qwen_magic.errors import QwenMagicError

    try:
        sys.exit(main())
    except QwenMagicError as error:
        sys.exit(f"error: {error}")
