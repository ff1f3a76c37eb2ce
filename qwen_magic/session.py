"""The kernel's one state object: :class:`Session`.

Everything qwen_magic keeps in a kernel lives in one plain object, as IPython's autoreload keeps
its state in one reloader and jupysql its connections in one manager:

* :attr:`Session.backend`: what writes the replies, a model loaded in this kernel
  (:class:`~qwen_magic.backends.kernel.backend.KernelBackend`) or a model on a server
  (:class:`~qwen_magic.backends.server.ServerBackend`, :meth:`Session.connect`); one at a time;
* :attr:`Session.conversations`: the notebook's named conversations;
* :attr:`Session.history`: the file they are saved to after each turn, if any.

The rules live here too: :meth:`Session.open` takes a request from the backend registry
(:mod:`qwen_magic.backends`: ``request("kernel", "demo")``, ``request("server", url)``); the
request says whether the backend in use is already what it asks for (the same model again is a
no-op) and checks everything before the current backend is released, so the session never
imports or special-cases a concrete backend. Restoring conversations drops the backend's
per-conversation caches; a history file is attached once per path and restored into a kernel
that has no turns yet. The magics only turn arguments into calls on the session
(:func:`current`), and so does the Python API (``qwen_magic.load``, ``qwen_magic.Chat``).

The session is kept in :mod:`qwen_magic._state`, which ``%reload_ext`` does not reload, so the
model and the conversations survive a reload of the extension's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_magic import _state, backends
from qwen_magic.conversation import ConversationBook
from qwen_magic.errors import QwenMagicError
from qwen_magic.storage import codec
from qwen_magic.storage import history as history_file

if TYPE_CHECKING:
    from qwen_magic.backends import BackendRequest
    from qwen_magic.backends.base import Backend
    from qwen_magic.backends.kernel.loading import LoadedModel, Progress


class Session:
    """One kernel's backend, conversations and history file."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.conversations = ConversationBook()
        self.history: history_file.HistoryStore | None = None
        #: Cells that failed in one of qwen_magic's own magics (a one-line mistake, an
        #: interrupted reply): ``%qwen_error`` passes over them (see ``notebook.last_error``).
        self.magic_errors: set[tuple[int, str, str]] = set()
        #: The last cell that failed since ``%load_ext``, as ``notebook.ErrorWatcher`` saw it.
        self.last_cell_error: Any = None

    # -- the backend ----------------------------------------------------------------------

    def require_backend(self) -> Backend:
        """The backend in use, or a one-line error saying how to get one."""
        if self.backend is None:
            raise QwenMagicError(
                "No model is loaded yet; run %qwen_load first (e.g. %qwen_load demo)."
            )
        return self.backend

    def open(self, request: BackendRequest) -> tuple[Backend, bool]:
        """Open the backend ``request`` asks for, unless it is the one in use already; return
        it, and whether it was opened now. The request checks everything before the current
        backend is released, so a mistake leaves it in use."""
        if request.is_open_in(self.backend):
            assert self.backend is not None
            return self.backend, False
        self.backend = request.open(self.backend, self.release)
        return self.backend, True

    def load_model(
        self, model: str | None = None, *, progress: Progress | None = print, **how: Any
    ) -> tuple[LoadedModel, bool]:
        """Load ``model`` in this kernel unless it is loaded already; return it, and whether it
        was loaded now. ``how``: ``loading.model_spec``'s options (dtype, device, …)."""
        backend, fresh = self.open(backends.request("kernel", model, progress=progress, **how))
        return backend.loaded, fresh  # type: ignore[attr-defined]  # a kernel backend's

    def connect(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key_env: str | None = None,
        context_length: int | None = None,
        progress: Progress | None = print,
    ) -> tuple[Backend, bool]:
        """Chat with a model on an OpenAI-compatible server instead of loading one; return the
        backend and whether it connected now (the same server and model again: a no-op)."""
        backend, fresh = self.open(
            backends.request(
                "server", url, model, api_key_env=api_key_env, context_length=context_length
            )
        )
        if fresh and progress is not None:
            progress(backend.summary())
        return backend, fresh

    def use(self, backend: Backend) -> Backend:
        """Make ``backend`` the one in use; the previous one is closed first."""
        if backend is not self.backend:
            self.release()
            self.backend = backend
        return backend

    def release(self) -> bool:
        """Close the backend (freeing a model's memory); True if there was one."""
        backend, self.backend = self.backend, None
        if backend is None:
            return False
        backend.close()
        return True

    # -- the history file -----------------------------------------------------------------

    def attach_history(self, shell: Any = None, explicit: str | None = None) -> str | None:
        """Start saving the conversations to the notebook's history file (or ``explicit``).

        Restores the file's conversations when this kernel has no turns yet. Returns a line to
        show (restored, or why the file was refused), or None when there is nothing to say.
        """
        if explicit:
            path = Path(explicit).expanduser()
        elif (notebook := history_file.notebook_path(shell)) is not None:
            path = history_file.history_path_for(notebook)
        else:
            return None
        if self.history is not None and self.history.path == path:
            return None
        self.history = history_file.HistoryStore(path)
        try:
            saved = self.history.load()
        except QwenMagicError as error:
            return f"Not saving conversations: {error}"
        if saved is not None and not any(self.conversations.conversations.values()):
            self._replace_conversations(saved)
            return f"Restored {codec.summary(saved)} from {path}."
        return None

    def autosave(self) -> str | None:
        """Save the conversations if a history file is attached (after every change); returns
        a line to show, if any. Never raises for the file's sake: a file that cannot be written
        pauses saving, with one line, until it can (see ``HistoryStore.save``)."""
        if self.history is None:
            return None
        return self.history.save(self.conversations)

    def history_target(self, file: str | None, configured: str = "") -> Path:
        """Where ``%qwen_save`` / ``%qwen_restore`` go: ``file``, else the configured or the
        attached history file."""
        if file:
            return Path(file).expanduser()
        if configured:
            return Path(configured).expanduser()
        if self.history is not None:
            return self.history.path
        raise QwenMagicError(
            "This frontend does not say which notebook runs, so there is no default file; "
            "give one, e.g. %qwen_save chat.qwen.json."
        )

    def save(self, path: Path) -> str:
        """Write every conversation to ``path`` (the history file: merged with other kernels'
        turns, and autosave resumes); returns a line saying what was saved."""
        return history_file.save_book(path, self.conversations, store=self.history)

    def restore(self, path: Path) -> str:
        """Replace the conversations with those saved in ``path``; returns what came back."""
        book = codec.read_book(path)
        self._replace_conversations(book)
        return codec.summary(book)

    def _replace_conversations(self, book: ConversationBook) -> None:
        book.default_system_prompt = self.conversations.default_system_prompt
        self.conversations = book
        if self.backend is not None:
            self.backend.forget_conversations()  # caches of the old conversations are useless


def current() -> Session:
    """The kernel's session, made on first use; it survives ``%reload_ext``."""
    if _state.session is None:
        _state.session = Session()
    return _state.session
