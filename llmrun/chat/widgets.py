"""The pieces of the chat screen: the message input, one view per message, the load panel
and the stats bar."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Label, Markdown, ProgressBar, Static, TextArea

from llmrun.chat.thinking import Parts, split_thinking
from llmrun.runtime.types import GenerationStats, LoadProgress


class MessageInput(TextArea):
    """Multi-line input: Enter sends, Shift+Enter / Ctrl+J add a line; pastes keep their lines."""

    DEFAULT_CSS = """
    MessageInput { height: auto; min-height: 3; max-height: 10; border: round $primary; }
    """
    # Enter and the newline keys are handled in _on_key, in order with the typed text (a
    # binding would run ahead of keys still queued, e.g. a fast paste-like burst); these
    # entries put them in the footer and the key help.
    BINDINGS = [
        Binding("enter", "submit", "Send"),
        Binding("shift+enter,ctrl+j", "newline", "Line", key_display="⇧⏎/^J"),
    ]
    KEY_ACTIONS = {"enter": "submit", "shift+enter": "newline", "ctrl+j": "newline"}

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        action = self.KEY_ACTIONS.get(event.key)
        if action is None:
            return  # TextArea's own handler inserts the character
        event.stop()
        event.prevent_default()  # no TextArea newline for Enter
        await self.run_action(action)

    def action_submit(self) -> None:
        self.post_message(self.Submitted(self.text))

    def action_newline(self) -> None:
        self.insert("\n")


class MessageView(Vertical):
    """One message: a role line, then the body (markdown for answers, literal text for the
    user's; an answer's thinking folded above it), then a note such as "stopped"."""

    DEFAULT_CSS = """
    MessageView { height: auto; margin: 0 1 1 1; padding: 0 1; }
    MessageView.user { background: $boost; }
    MessageView.dropped { opacity: 50%; }
    MessageView .role { color: $text-muted; text-style: bold; }
    MessageView.assistant .role { color: $accent; }
    MessageView .note { color: $text-muted; text-style: italic; }
    MessageView .note.empty { display: none; }
    MessageView Markdown { margin: 0; padding: 0; }
    MessageView Markdown > MarkdownBlock:last-child { margin-bottom: 0; }
    MessageView Collapsible { margin: 0; padding: 0; border: none; background: $boost; }
    MessageView Collapsible.empty { display: none; }
    MessageView .thinking-text { color: $text-muted; }
    """

    def __init__(self, role: str, content: str, speaker: str, note: str = ""):
        super().__init__(classes=role)
        self.role, self.content, self.speaker = role, content, speaker
        self.note_text = note

    def compose(self) -> ComposeResult:
        yield Label(self.speaker, classes="role")
        if self.role == "assistant":
            parts = split_thinking(self.content, final=True)
            yield Collapsible(Static(parts.thinking or "", markup=False, classes="thinking-text"),
                              title=self.thinking_title(parts), collapsed=True,
                              classes="" if parts.thinking is not None else "empty")
            yield Markdown(parts.answer)
        else:
            yield Static(self.content, markup=False, classes="body")
        yield Static(self.note_text, markup=False, classes="note" if self.note_text else "note empty")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    @staticmethod
    def thinking_title(parts: Parts) -> str:
        if parts.thinking_now:
            return "Thinking..."
        return f"Thought ({len((parts.thinking or '').split())} words)"

    def show_thinking(self, parts: Parts) -> None:
        """The thinking so far: open while it streams, folded once the answer begins."""
        fold = self.query_one(Collapsible)
        fold.set_class(parts.thinking is None, "empty")
        fold.title = self.thinking_title(parts)
        fold.collapsed = not parts.thinking_now
        fold.query_one(".thinking-text", Static).update(parts.thinking or "")

    def set_note(self, note: str) -> None:
        self.note_text = note
        line = self.query_one(".note", Static)
        line.update(note)
        line.set_class(not note, "empty")


class Notice(Static):
    """A line in the conversation that is not a message: dropped history, errors."""

    DEFAULT_CSS = """
    Notice { margin: 0 1 1 1; padding: 0 1; color: $warning; }
    Notice.error { color: $error; text-style: bold; }
    """

    def __init__(self, text: str, error: bool = False):
        super().__init__(text, markup=False, classes="error" if error else "")
        self.text = text


class LoadPanel(Vertical):
    """Model loading: the stage, its progress, or the error that stopped it."""

    DEFAULT_CSS = """
    LoadPanel { height: auto; padding: 0 2; }
    LoadPanel.hidden { display: none; }
    LoadPanel.failed #load-status { color: $error; text-style: bold; }
    LoadPanel.failed ProgressBar { display: none; }
    """

    def compose(self) -> ComposeResult:
        yield Label("loading the model...", id="load-status")
        yield ProgressBar(show_eta=False)

    def show(self, p: LoadProgress) -> None:
        status = f"{p.stage}: {p.message}" if p.message else p.stage
        if p.total:
            status += f" {p.done}/{p.total}"
        self.query_one("#load-status", Label).update(status)
        self.query_one(ProgressBar).update(total=p.total or None, progress=p.done)

    def fail(self, message: str) -> None:
        self.add_class("failed")
        self.query_one("#load-status", Label).update(f"could not load the model: {message}")


ENDINGS = {"stop": "", "length": " (max tokens)", "context": " (context full)",
           "cancelled": " (stopped)"}


class StatsBar(Static):
    """Model, weights, threads; and for the last answer TTFT, prefill and decode tokens/s and
    tokens generated: live while streaming, the engine's own figures when it ends."""

    DEFAULT_CSS = """
    StatsBar { height: auto; padding: 0 1; background: $panel; color: $text; }
    """

    def __init__(self):
        super().__init__("", markup=False)
        self.model_part = "loading the model..."
        self.answer_part = ""

    def on_mount(self) -> None:
        self.refresh_text()

    def set_model(self, name: str, weights: str, threads: int | None) -> None:
        """threads: None where they are not ours to say (a remote server's)."""
        self.model_part = f"{name} · {weights}" + (f" · {threads} threads" if threads is not None else "")
        self.refresh_text()

    def show_live(self, ttft_s: float | None, prompt_tokens: int, tokens: int,
                  decode_tps: float | None) -> None:
        if ttft_s is None:
            self.answer_part = f"prefill of {prompt_tokens} tokens..."
        else:
            # the prefill rate waits for the engine's figures: they know how much was reused
            decode = f"{decode_tps:.1f}" if decode_tps is not None else "-"
            self.answer_part = (f"ttft {ttft_s:.2f}s · "
                                f"decode {decode} t/s · {tokens} tokens")
        self.refresh_text()

    def show_final(self, stats: GenerationStats) -> None:
        ended = ENDINGS.get(stats.finish_reason, f" ({stats.finish_reason})")
        reused = f" · {stats.reused_tokens} prompt tokens reused" if stats.reused_tokens else ""
        self.answer_part = (f"ttft {stats.ttft_s:.2f}s · prefill {stats.prefill_tps:.1f} t/s · "
                            f"decode {stats.decode_tps:.1f} t/s · {stats.generated_tokens} tokens"
                            f"{ended}{reused}")
        self.refresh_text()

    def refresh_text(self) -> None:
        parts = [self.model_part, self.answer_part] if self.answer_part else [self.model_part]
        self.update(" │ ".join(parts))
