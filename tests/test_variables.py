"""The variables summary (qwen_magic.notebook.variables): bounded, safe, pandas and numpy aware."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest

from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook.variables import MAX_VARIABLES, parse_names, summarize


class Booby:
    """An object whose repr and properties must never run."""

    touched = False

    @property
    def value(self):
        Booby.touched = True
        raise AssertionError("a property was read")

    def __repr__(self):
        Booby.touched = True
        raise AssertionError("repr was called")

    def __len__(self):
        Booby.touched = True
        raise AssertionError("len was called")


def test_a_data_frame_shows_its_shape_columns_and_first_rows():
    """A DataFrame is described by shape, columns with dtypes and a few rows, not all of them."""
    frame = pd.DataFrame({"region": ["north", "south"] * 617, "amount": np.arange(1234.0)})
    text = summarize({"sales": frame})
    assert "sales: pandas DataFrame, 1,234 rows × 2 columns" in text
    assert "amount (float64)" in text
    assert "north" in text and "1233" not in text


def test_arrays_lists_dicts_and_text_get_sizes_and_short_previews():
    """numpy arrays give shape and dtype; containers their length and a cut preview."""
    text = summarize(
        {
            "grid": np.zeros((300, 400), dtype=np.float32),
            "items": list(range(1000)),
            "config": {"a": 1, "b": [1, 2, 3]},
            "title": "x" * 10_000,
        }
    )
    assert "grid: numpy array, shape 300 × 400, dtype float32" in text
    assert "items: list, 1,000 items: [0, 1, 2, 3, 4, ...]" in text
    assert "config: dict, 2 keys" in text
    assert "title: str, 10,000 characters" in text
    assert len(text) < 600


def test_private_names_modules_callables_and_ipython_names_are_left_out():
    """Only the user's data is listed."""
    namespace = {
        "_hidden": 1,
        "np": np,
        "helper": lambda: None,
        "Thing": Booby,
        "In": [],
        "Out": {},
        "kept": 3,
        "mine": 4,
    }
    text = summarize(namespace, hidden={"mine"})
    assert text == "kept: int: 3"


def test_other_objects_are_named_by_type_without_running_their_code():
    """An unknown object's repr, len and properties are never called, also inside a list."""
    Booby.touched = False
    text = summarize({"trap": Booby(), "traps": [Booby()]})
    assert text == "trap: tests Booby\ntraps: list, 1 item: [<tests Booby>]"
    assert not Booby.touched


def test_the_summary_is_bounded():
    """Many variables, or long descriptions, are cut with a note."""
    namespace = {f"v{i}": "y" * 30 for i in range(100)}
    text = summarize(namespace)
    assert text.startswith(f"({100 - MAX_VARIABLES} older variables left out)")
    assert "v99" in text and "v0:" not in text
    assert len(summarize(namespace, limit=300)) < 360


def test_vars_restricts_and_a_missing_name_is_one_line():
    """--vars lists only the names given, and a missing name is refused with the fix."""
    namespace = {"a": 1, "b": 2}
    assert summarize(namespace, parse_names("b")) == "b: int: 2"
    with pytest.raises(QwenMagicError, match="--vars: no variable named 'c'"):
        summarize(namespace, parse_names("b, c"))
    with pytest.raises(QwenMagicError, match="--vars needs variable names"):
        parse_names(" , ")


def test_the_summary_never_imports_pandas_or_numpy():
    """Describing variables where pandas is not imported does not import it."""
    code = (
        "import sys; from qwen_magic.notebook.variables import summarize; "
        "print(summarize({'x': [1, 2]})); print('pandas' in sys.modules, 'numpy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["x: list, 2 items: [1, 2]", "False False"]


def test_a_module_subclass_or_broken_object_does_not_break_the_summary():
    """An object whose description fails is named with the failure, and the rest goes on."""

    class Frame(pd.DataFrame):
        @property
        def shape(self):
            raise RuntimeError("no shape")

    text = summarize({"odd": Frame({"a": [1]}), "mod": types.SimpleNamespace(a=1), "n": 1})
    assert "odd: " in text and "could not be described: RuntimeError" in text
    assert "n: int: 1" in text
