"""Approving a step with buttons under the cell: **Run**, **Skip**, **Edit**, **Stop**.

In JupyterLab (and wherever ipywidgets render) ``%%qwen --run`` asks with buttons rather than
a text box: the code to run is in the reply just above, highlighted, and a row of buttons
under it says what happens next. **Edit** opens the code in a text area, prefilled, and
**Run** then runs what the text area holds. The cell is still running while it waits, so the
clicks (and the text area's edits) reach the kernel as ``comm_msg``\\ s the busy kernel would
not handle until the cell ended: the Stop button's :class:`~qwen_magic.notebook.comm_pump.CommPump`
handles these widgets' messages from the cell's own thread while it waits, and leaves every
other message queued in order.

Where the pump cannot work (another ipykernel major version), :class:`ButtonApprover` asks
with its ``fallback`` (the stdin prompt) instead, so there is never a button that cannot be
clicked. Once a step is decided the buttons are replaced by one line of text saying what was
chosen, so the saved notebook reads the same anywhere. Ctrl-C (or the kernel's stop button)
while the buttons wait ends the turn, as at the text prompt; nothing runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qwen_magic.agent import Approver, Decision
from qwen_magic.notebook.comm_pump import CommPump

#: How often the waiting cell handles the buttons' messages.
POLL_SECONDS = 0.05
CHOSEN = {
    "run": "Step {step}: run (approved).",
    "edit": "Step {step}: your edited code runs.",
    "skip": "Step {step}: skipped; the model is told the code did not run.",
    "stop": "Step {step}: stopped.",
}
#: The editor shows code in the notebook's code font (ipywidgets has no font setting for it).
CODE_CLASS = "qwen-magic-code"
CODE_STYLE = (
    f"<style>.{CODE_CLASS} textarea {{font-family: var(--jp-code-font-family, monospace); "
    "font-size: var(--jp-code-font-size, 13px);}</style>"
)
WAITING_TEXT = (
    "Step {step}: run this code? Click Run, Skip, Edit or Stop under the cell (if no buttons "
    "show, interrupt the kernel and set %config QwenMagics.approval = 'prompt')."
)


class ButtonApprover:
    """Asks for each step with a row of buttons; ``fallback`` asks where clicks cannot arrive."""

    def __init__(
        self,
        fallback: Approver,
        *,
        poll_seconds: float = POLL_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.fallback = fallback
        self.poll_seconds = poll_seconds
        self.sleep = sleep
        #: The buttons of the step being decided (tests click them).
        self.buttons: ApprovalButtons | None = None

    def decide(self, code: str, step: int) -> Decision:
        buttons = ApprovalButtons(code, step)
        pump = CommPump.attach(buttons.widgets())
        if pump is None and buttons.needs_pump:
            buttons.close("")
            return self.fallback.decide(code, step)
        self.buttons = buttons
        outcome = "Step {step}: interrupted at the approval; nothing ran."
        try:
            buttons.show()
            while buttons.decision is None:
                if pump is not None:
                    pump.poll()
                if buttons.decision is None:
                    self.sleep(self.poll_seconds)
            decision = buttons.decision
            unchanged = decision.action == "edit" and (decision.code or "").strip() == code.strip()
            outcome = CHOSEN["run" if unchanged else decision.action]
            return decision
        finally:
            buttons.close(outcome.format(step=step))
            self.buttons = None


class ApprovalButtons:
    """One step's widgets: a label, Run / Skip / Edit / Stop, and a text area for editing."""

    def __init__(self, code: str, step: int) -> None:
        import ipywidgets

        self.code = code
        self.step = step
        self.decision: Decision | None = None
        self._handle: Any = None
        self.label = ipywidgets.HTML(f"<b>Step {step}</b>: run the code above?")
        self.run = self._button("Run", "play", "success", "Run this code in your kernel")
        self.skip = self._button("Skip", "forward", "", "Do not run it; the model is told so")
        self.edit = self._button("Edit", "pencil", "", "Change the code, then click Run")
        self.stop = self._button("Stop", "stop", "danger", "End this turn; nothing runs")
        self.editor = ipywidgets.Textarea(
            value=code,
            rows=min(max(code.count("\n") + 2, 4), 24),
            layout=ipywidgets.Layout(width="100%", display="none"),
        )
        self.editor.add_class(CODE_CLASS)
        self.run.on_click(lambda _b: self._choose("run"))
        self.skip.on_click(lambda _b: self._choose("skip"))
        self.edit.on_click(lambda _b: self._open_editor())
        self.stop.on_click(lambda _b: self._choose("stop"))
        self.row = ipywidgets.HBox([self.label, self.run, self.skip, self.edit, self.stop])
        self.style = ipywidgets.HTML(CODE_STYLE)
        self.box = ipywidgets.VBox([self.row, self.editor, self.style])

    @staticmethod
    def _button(description: str, icon: str, style: str, tooltip: str) -> Any:
        import ipywidgets

        return ipywidgets.Button(
            description=description,
            icon=icon,
            button_style=style,
            tooltip=tooltip,
            layout=ipywidgets.Layout(width="auto"),
        )

    @property
    def needs_pump(self) -> bool:
        """In a kernel, clicks only arrive through the pump; outside one (tests calling
        ``click()``) they need none."""
        from qwen_magic.notebook.views import in_widget_frontend

        return in_widget_frontend()

    def widgets(self) -> list[Any]:
        """Every widget whose messages the waiting cell must handle."""
        return [self.run, self.skip, self.edit, self.stop, self.editor]

    def show(self) -> None:
        from IPython.display import display

        bundle = self.box._repr_mimebundle_()
        bundle["text/plain"] = WAITING_TEXT.format(step=self.step)
        self._handle = display(bundle, raw=True, display_id=True)

    def _open_editor(self) -> None:
        self.editor.layout.display = None
        self.edit.disabled = True
        self.run.description = "Run edited"
        self.label.value = f"<b>Step {self.step}</b>: edit the code below, then Run."

    def _choose(self, action: str) -> None:
        if self.decision is not None:
            return
        if action == "run" and self.edit.disabled:  # the editor is open: run what it holds
            edited = self.editor.value
            self.decision = Decision("edit", edited) if edited.strip() else Decision("skip")
        else:
            self.decision = Decision(action)
        for button in (self.run, self.skip, self.edit, self.stop):
            button.disabled = True

    def close(self, outcome: str) -> None:
        """Replace the buttons by ``outcome``'s line and close the widgets."""
        if self._handle is not None:
            self._handle.update({"text/plain": outcome}, raw=True)
            self._handle = None
        for widget in (*self.widgets(), self.label, self.style, self.row, self.box):
            widget.close()
