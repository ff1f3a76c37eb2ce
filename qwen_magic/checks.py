"""What saved conversations must look like: one-line reasons to refuse a file, field by field.

The history file (:mod:`qwen_magic.storage.codec`) and :meth:`Conversation.from_dict
<qwen_magic.conversation.Conversation.from_dict>` refuse data that is not what qwen_magic
wrote: a field of the wrong JSON type, an unknown field, a conversation name no magic could
type, steps that are not steps. Each check returns the reason as a phrase (None: fine), so the
caller can say which entry of which file is wrong.
"""

from __future__ import annotations

import math
import unicodedata

from qwen_magic.steps import steps_problem

#: Longest conversation name accepted (it is shown in headings and one-line messages).
MAX_NAME_LENGTH = 200


def name_problem(name: object, *, new: bool = True) -> str | None:
    """Why ``name`` cannot name a conversation (e.g. 'is empty'), or None when it can.

    With ``new`` False (a name read from a file) only what breaks one-line messages counts:
    a name saved before names were checked (an empty one, say) still loads.
    """
    if not isinstance(name, str):
        return f"must be text, not {json_type(name)}"
    if not new:
        return "contains a line break or another control character" if _has_control(name) else None
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    if _has_control(name):
        return "contains a line break or another control character"
    if name != name.strip():
        return "starts or ends with a space"
    return None


def _has_control(text: str) -> bool:
    return any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in text)


#: A turn's saved fields: the JSON types each may hold ("null" where None is allowed).
_TURN_FIELDS: dict[str, tuple[str, ...]] = {
    "user": ("text",),
    "assistant": ("text",),
    "cell_id": ("text", "null"),
    "interrupted": ("a boolean",),
    "model": ("text", "null"),
    "options": ("an object",),
    "stats": ("an object",),
    "created": ("a number",),
    "turn_id": ("text",),
    "steps": ("a list",),
}


_REQUIRED_TURN_FIELDS = ("user", "assistant")


_CONVERSATION_FIELDS = ("name", "system_prompt", "turns")


def json_type(value: object) -> str:
    """How a JSON reader would name ``value``'s type: null, a boolean, a number, text, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _type_problem(field_name: str, value: object, allowed: tuple[str, ...]) -> str | None:
    kind = json_type(value)
    if kind not in allowed:
        wanted = " or ".join("true or false" if a == "a boolean" else a for a in allowed)
        return f"{field_name!r} must be {wanted}, not {kind}"
    if kind == "a number" and not math.isfinite(value):  # type: ignore[arg-type]
        return f"{field_name!r} must be a finite number, not {value}"
    if field_name == "turn_id" and not value:
        return "'turn_id' must not be empty"
    return None


def turn_problem(data: object) -> str | None:
    """Why ``data`` is not a saved :class:`Turn` (one phrase naming the field), or None."""
    if not isinstance(data, dict):
        return f"must be an object, not {json_type(data)}"
    for name in _REQUIRED_TURN_FIELDS:
        if name not in data:
            return f"{name!r} is missing"
    for name, value in data.items():
        if name not in _TURN_FIELDS:
            return f"has an unknown field {name!r}"
        if (problem := _type_problem(name, value, _TURN_FIELDS[name])) is not None:
            return problem
    if "steps" in data and (problem := steps_problem(data["steps"])) is not None:
        return problem
    return None


def conversation_problem(data: object, key: str | None = None) -> str | None:
    """Why ``data`` is not a saved :class:`Conversation`, naming the entry, or None.

    The text reads ``conversation 'default', turn 3: 'user' must be text, not null``; turns are
    numbered from 1, as ``%qwen_history`` shows them. Turn ids must be unique within it.
    """
    where = "conversation" if key is None else f"conversation {key!r}"
    if not isinstance(data, dict):
        return f"{where} must be an object, not {json_type(data)}"
    for name in _CONVERSATION_FIELDS:
        if name not in data:
            return f"{where}: {name!r} is missing"
    for name in data:
        if name not in _CONVERSATION_FIELDS:
            return f"{where}: unknown field {name!r}"
    name = data["name"]
    if (problem := name_problem(name, new=False)) is not None:
        return f"{where}: the name {name!r} {problem}"
    if key is not None and name != key:
        return f"{where}: its 'name' is {name!r}, not the name it is filed under"
    where = f"conversation {name!r}"
    if not isinstance(data["system_prompt"], str):
        return f"{where}: 'system_prompt' must be text, not {json_type(data['system_prompt'])}"
    if not isinstance(data["turns"], list):
        return f"{where}: 'turns' must be a list, not {json_type(data['turns'])}"
    seen: dict[str, int] = {}
    for number, turn in enumerate(data["turns"], start=1):
        if (problem := turn_problem(turn)) is not None:
            return f"{where}, turn {number}: {problem}"
        turn_id = turn.get("turn_id")
        if turn_id is not None:
            if turn_id in seen:
                return f"{where}, turn {number}: 'turn_id' repeats turn {seen[turn_id]}'s"
            seen[turn_id] = number
    return None
