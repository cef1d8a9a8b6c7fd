"""Modal dialogs: conversation settings, the conversation list, renaming."""

from __future__ import annotations

import dataclasses
import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, TextArea
from textual.widgets.option_list import Option

from llmrun.chat.store import ChatStore, Conversation, ConversationSettings
from llmrun.runtime.types import SamplingSettings



def dialog_css(screen: str) -> str:
    """Centred box styles; DEFAULT_CSS is scoped to the screen type, hence the name."""
    return f"""
    {screen} {{ align: center middle; }}
    .dialog {{ width: 80; max-width: 95%; height: auto; max-height: 90%;
               border: thick $primary; background: $surface; padding: 1 2; }}
    .dialog .title {{ text-style: bold; }}
    .dialog .error {{ color: $error; height: auto; }}
    .dialog .hint {{ color: $text-muted; padding: 1 0; }}
    .dialog Horizontal {{ height: auto; margin-top: 1; }}
    .dialog Button {{ margin-right: 2; }}
    """


class SettingsDialog(ModalScreen[ConversationSettings | None]):
    """System prompt, temperature, top-p and max new tokens of one conversation."""

    DEFAULT_CSS = dialog_css("SettingsDialog") + """
    #system { height: 5; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: ConversationSettings, effective: SamplingSettings):
        super().__init__()
        self.settings, self.effective = settings, effective

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Conversation settings", classes="title")
            yield Label("System prompt")
            yield TextArea(self.settings.system_prompt, id="system")
            yield Label("Temperature (0 = greedy)")
            yield Input(str(self.effective.temperature), id="temperature", type="number")
            yield Label("Top-p (1 = off)")
            yield Input(str(self.effective.top_p), id="top_p", type="number")
            yield Label("Max new tokens")
            yield Input(str(self.effective.max_new_tokens), id="max_new_tokens", type="integer")
            yield Label("", id="error", classes="error")
            with Horizontal():
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")
                yield Label("Ctrl+S saves, Esc cancels", classes="hint")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        try:
            settings = self.read()
        except ValueError as exc:
            self.query_one("#error", Label).update(str(exc))
            return
        self.dismiss(settings)

    def read(self) -> ConversationSettings:
        value = lambda key: self.query_one(f"#{key}", Input).value.strip()  # noqa: E731
        try:
            temperature, top_p = float(value("temperature")), float(value("top_p"))
            max_new_tokens = int(value("max_new_tokens"))
        except ValueError:
            raise ValueError("temperature and top-p take numbers, max new tokens an integer")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        if max_new_tokens < 1:
            raise ValueError("max new tokens must be >= 1")
        return ConversationSettings(self.query_one("#system", TextArea).text.strip(),
                                    temperature, top_p, max_new_tokens)


class RenameDialog(ModalScreen[str | None]):
    DEFAULT_CSS = dialog_css("RenameDialog")
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str):
        super().__init__()
        self.old_title = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Rename conversation", classes="title")
            yield Input(self.old_title, id="title")
            yield Label("Enter saves, Esc cancels", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclasses.dataclass
class Opened:
    """What the conversation list asks the app for: a conversation to show, or a new one."""

    conversation: Conversation | None


class ConversationsDialog(ModalScreen[Opened | None]):
    """Saved conversations, newest first: open, rename, delete, or start a new one."""

    DEFAULT_CSS = dialog_css("ConversationsDialog") + """
    OptionList { height: auto; max-height: 20; }
    """
    BINDINGS = [
        Binding("escape", "cancel", "Close"),
        Binding("n", "new", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
    ]

    def __init__(self, store: ChatStore, current_id: int | None):
        super().__init__()
        self.store, self.current_id = store, current_id
        self.items: list[Conversation] = []
        self.armed_delete: int | None = None  # id waiting for the second "d"

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Conversations", classes="title")
            yield OptionList(id="conversations")
            yield Label("Enter opens · n new · r rename · d delete (twice) · Esc closes",
                        id="hint", classes="hint")

    def on_mount(self) -> None:
        self.reload()
        self.query_one(OptionList).focus()

    def reload(self) -> None:
        self.items = self.store.conversations()
        options = self.query_one(OptionList)
        highlighted = options.highlighted
        options.clear_options()
        for c in self.items:
            mark = "● " if c.id == self.current_id else "  "
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
            options.add_option(Option(f"{mark}{c.title}  ({c.message_count} messages, {when})",
                                      id=str(c.id)))
        if not self.items:
            options.add_option(Option("no saved conversations yet: n starts a new one",
                                      disabled=True))
        else:
            options.highlighted = min(highlighted or 0, len(self.items) - 1)

    def selected(self) -> Conversation | None:
        index = self.query_one(OptionList).highlighted
        return self.items[index] if index is not None and index < len(self.items) else None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        conversation = self.selected()
        if conversation is not None:
            self.dismiss(Opened(conversation))

    def action_new(self) -> None:
        self.dismiss(Opened(None))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_rename(self) -> None:
        conversation = self.selected()
        if conversation is None:
            return

        def renamed(title: str | None) -> None:
            if title:
                self.store.rename(conversation.id, title)
                self.reload()

        self.app.push_screen(RenameDialog(conversation.title), renamed)

    def action_delete(self) -> None:
        conversation = self.selected()
        if conversation is None:
            return
        hint = self.query_one("#hint", Label)
        if self.armed_delete != conversation.id:
            self.armed_delete = conversation.id
            hint.update(f"press d again to delete {conversation.title!r}")
            return
        self.armed_delete = None
        self.store.delete(conversation.id)
        hint.update(f"deleted {conversation.title!r}")
        self.reload()
