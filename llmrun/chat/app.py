"""The chat app: a transcript, the input, a stats bar and the key footer. The model loads
and generates in worker threads; their results come back through call_from_thread."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown

from llmrun.chat.answer import Answer
from llmrun.chat.clipboard import CodeBlock, code_blocks, copy_text
from llmrun.chat.context import fit_history
from llmrun.chat.dialogs import ConversationsDialog, Opened, SettingsDialog
from llmrun.chat.store import ChatStore, Conversation, ConversationSettings, StoredMessage
from llmrun.chat.thinking import split_thinking
from llmrun.chat.widgets import LoadPanel, MessageInput, MessageView, Notice, StatsBar
from llmrun.errors import LlmrunError
from llmrun.runtime.types import ChatMessage, GenerationChunk, GenerationStats, SamplingSettings

FINISH_NOTES = {
    "stop": "",
    "length": "stopped at max new tokens",
    "context": "stopped at the end of the model's context",
    "cancelled": "stopped (Esc)",
}


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LlmrunError) else f"{type(exc).__name__}: {exc}"


@dataclass
class Shown:
    """A saved message and its view in the transcript."""

    message: StoredMessage
    view: MessageView


class ChatApp(App):
    TITLE = "llmrun chat"
    CSS = """
    #transcript { height: 1fr; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+o", "conversations", "Chats"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+r", "regenerate", "Retry"),
        Binding("ctrl+t", "copy_answer", "Copy"),
        Binding("ctrl+b", "copy_code", "Code"),
        Binding("f1", "toggle_keys", "Keys"),
    ]

    def __init__(self, store: ChatStore, load_engine: Callable,
                 default_settings: Callable[[object], SamplingSettings], system_prompt: str = "",
                 template_kwargs: dict | None = None):
        """load_engine(progress) returns an Engine (or anything with its interface);
        default_settings(engine) gives the sampling settings a conversation starts from;
        template_kwargs are further chat template variables (e.g. enable_thinking=False)."""
        super().__init__()
        self.store = store
        self.load_engine, self.default_settings = load_engine, default_settings
        self.default_system_prompt = system_prompt
        self.template_kwargs = template_kwargs or {}
        self.engine = None
        self.defaults: SamplingSettings | None = None
        self.load_error: str | None = None
        self.conversation = self.blank_conversation()
        self.shown: list[Shown] = []
        self.answer: Answer | None = None  # the one being streamed
        self.last_answer: Answer | None = None
        self.stream = None  # MarkdownStream of the answer being streamed
        self.engine_lock = threading.Lock()  # one generation at a time on the engine

    # --- layout and loading ------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield VerticalScroll(id="transcript")
        yield LoadPanel()
        yield MessageInput(id="input", placeholder="Message (Enter sends, Shift+Enter or "
                           "Ctrl+J adds a line)")
        yield StatsBar()
        yield Footer()

    @property
    def transcript(self) -> VerticalScroll:
        return self.query_one("#transcript", VerticalScroll)

    @property
    def stats_bar(self) -> StatsBar:
        return self.query_one(StatsBar)

    def on_mount(self) -> None:
        self.sub_title = self.conversation.title
        self.query_one(MessageInput).focus()
        self.transcript.anchor()
        self.load_model()

    @work(thread=True, exit_on_error=False, group="load")
    def load_model(self) -> None:
        panel = self.query_one(LoadPanel)
        try:
            engine = self.load_engine(lambda p: self.call_from_thread(panel.show, p))
            defaults = self.default_settings(engine)
        except Exception as exc:  # model not found, bad file...: shown, the app stays up
            self.call_from_thread(self.model_failed, describe(exc))
            return
        self.call_from_thread(self.model_ready, engine, defaults)

    def model_ready(self, engine, defaults: SamplingSettings) -> None:
        self.engine, self.defaults = engine, defaults
        self.query_one(LoadPanel).add_class("hidden")
        self.stats_bar.set_model(engine.name, engine.quant_label, engine.threads)
        for shown in self.shown:
            if shown.message.role == "assistant":
                shown.view.query_one(".role").update(engine.name)
        self.notify(f"{engine.name} is ready", timeout=3)

    async def model_failed(self, message: str) -> None:
        self.load_error = message
        self.query_one(LoadPanel).fail(message)
        self.stats_bar.set_model("no model", "-", 0)
        await self.show_notice(f"could not load the model: {message}", error=True)

    # --- the transcript --------------------------------------------------------------
    def speaker(self, role: str) -> str:
        if role == "user":
            return "You"
        return self.engine.name if self.engine is not None else "Assistant"

    async def show_message(self, message: StoredMessage) -> None:
        view = MessageView(message.role, message.content, self.speaker(message.role),
                           FINISH_NOTES.get(message.finish_reason, ""))
        await self.transcript.mount(view)
        self.shown.append(Shown(message, view))

    async def show_notice(self, text: str, error: bool = False) -> None:
        await self.transcript.mount(Notice(text, error))
        if error:
            self.notify(text, severity="error", timeout=8)

    def blank_conversation(self) -> Conversation:
        return Conversation(None, settings=ConversationSettings(self.default_system_prompt))

    async def show_conversation(self, conversation: Conversation) -> None:
        await self.stop_answer()
        self.conversation = conversation
        self.sub_title = conversation.title
        self.shown = []
        await self.transcript.remove_children()
        if conversation.id is not None:
            for message in self.store.messages(conversation.id):
                await self.show_message(message)
        self.transcript.anchor()
        self.query_one(MessageInput).focus()

    # --- sending and streaming -------------------------------------------------------
    def sampling(self) -> SamplingSettings:
        s = self.conversation.settings
        chosen = dict(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens)
        return dataclasses.replace(self.defaults, **{k: v for k, v in chosen.items() if v is not None})

    def can_generate(self) -> bool:
        if self.engine is None:
            self.notify(f"no model: {self.load_error}" if self.load_error else
                        "the model is still loading", severity="warning")
            return False
        if self.answer is not None:
            self.notify("an answer is being written: Esc stops it", severity="warning")
            return False
        return True

    async def on_message_input_submitted(self, event: MessageInput.Submitted) -> None:
        text = event.text.strip()
        if not text or not self.can_generate():
            return
        self.query_one(MessageInput).clear()
        if self.conversation.id is None:
            title = text.splitlines()[0][:48]
            self.conversation = self.store.create_conversation(title, self.conversation.settings)
            self.sub_title = title
        await self.show_message(self.store.add_message(self.conversation.id, "user", text))
        self.transcript.anchor()
        await self.start_answer()

    async def start_answer(self) -> None:
        settings = self.sampling()
        history = [ChatMessage(s.message.role, s.message.content) for s in self.shown]
        try:
            fitted = fit_history(self.engine, self.conversation.settings.system_prompt, history,
                                 settings.max_new_tokens, self.template_kwargs)
        except Exception as exc:  # context full, or a template that rejects the history
            await self.show_notice(describe(exc), error=True)
            return
        for i, shown in enumerate(self.shown):
            shown.view.set_class(i < fitted.dropped, "dropped")
        if fitted.dropped:
            await self.show_notice(
                f"{fitted.dropped} earlier message(s) no longer fit in the context "
                f"({self.engine.context_length} tokens, {settings.max_new_tokens} kept for the "
                "answer): they are dimmed and were not sent")
        view = MessageView("assistant", "", self.speaker("assistant"), "writing... (Esc stops)")
        await self.transcript.mount(view)
        self.answer = Answer(view, len(fitted.ids))
        self.stream = Markdown.get_stream(view.markdown)
        self.stats_bar.show_live(None, len(fitted.ids), 0, None)
        self.generate(self.answer, fitted.ids, settings)

    @work(thread=True, exit_on_error=False, group="generate")
    def generate(self, answer: Answer, ids: list[int], settings: SamplingSettings) -> None:
        with self.engine_lock:  # a stopped answer may still be finishing its token
            if answer.stop.is_set():
                return
            try:
                for chunk in self.engine.stream_generate(ids, settings, answer.stop):
                    self.call_from_thread(self.on_chunk, answer, chunk)
            except Exception as exc:  # a failed generation shows in the app
                self.call_from_thread(self.generation_failed, answer, describe(exc))

    async def on_chunk(self, answer: Answer, chunk: GenerationChunk) -> None:
        if answer.finished:  # stopped with Esc: its text stays as it was; take the figures
            if chunk.stats is not None and self.answer is None and self.last_answer is answer:
                self.stats_bar.show_final(chunk.stats)
            return
        answer.add(chunk.text, chunk.token is not None)
        if chunk.text:
            await self.show_answer_so_far(answer)
        if chunk.finished:
            await self.finish_answer(answer, chunk.stats)
        else:
            self.stats_bar.show_live(answer.ttft_s, answer.prompt_tokens, answer.tokens,
                                     answer.decode_tps)

    async def show_answer_so_far(self, answer: Answer) -> None:
        """The thinking in its fold, the answer's new text into the markdown stream."""
        parts = split_thinking(answer.text)
        if parts.thinking is not None:
            answer.view.show_thinking(parts)
        if parts.answer.startswith(answer.streamed):
            await self.stream.write(parts.answer[len(answer.streamed):])
        else:  # what was streamed turned out to be thinking (its block opened in the prompt)
            await self.stream.stop()
            await answer.view.markdown.update(parts.answer)
            self.stream = Markdown.get_stream(answer.view.markdown)
        answer.streamed = parts.answer

    async def finish_answer(self, answer: Answer, stats: GenerationStats | None) -> None:
        """The stream ended (stats) or was stopped (None): one full render, then save."""
        answer.finished = True
        self.answer, self.last_answer = None, answer
        await self.stream.stop()
        text = answer.text.strip()
        reason = stats.finish_reason if stats is not None else "cancelled"
        if stats is not None:
            self.stats_bar.show_final(stats)
        else:
            self.stats_bar.show_live(answer.ttft_s, answer.prompt_tokens, answer.tokens,
                                     answer.decode_tps)
        if not text:
            await answer.view.remove()
            await self.show_notice("stopped before the first token" if reason == "cancelled"
                                   else "the model gave an empty answer")
            return
        parts = split_thinking(text, final=True)
        if parts.thinking is not None:
            answer.view.show_thinking(parts)
        await answer.view.markdown.update(parts.answer)
        answer.view.content = text  # the thinking too: the template decides what history keeps
        answer.view.set_note(FINISH_NOTES.get(reason, ""))
        message = self.store.add_message(self.conversation.id, "assistant", text, reason)
        self.shown.append(Shown(message, answer.view))

    async def generation_failed(self, answer: Answer, message: str) -> None:
        if answer.finished:
            return
        answer.finished = True
        self.answer, self.last_answer = None, answer
        await self.stream.stop()
        if answer.text.strip():
            answer.view.set_note("generation failed: this partial answer is not saved")
        else:
            await answer.view.remove()
        await self.show_notice(f"generation failed: {message}", error=True)

    async def stop_answer(self) -> None:
        if self.answer is not None:
            self.answer.stop.set()
            await self.finish_answer(self.answer, None)

    # --- actions -----------------------------------------------------------------------
    async def action_quit(self) -> None:
        if self.answer is not None:
            self.answer.stop.set()  # the worker thread ends after its current token
        await super().action_quit()

    async def action_stop(self) -> None:
        await self.stop_answer()

    async def action_new_chat(self) -> None:
        await self.show_conversation(self.blank_conversation())

    def action_conversations(self) -> None:
        async def chosen(result: Opened | None) -> None:
            if result is not None:
                await self.show_conversation(result.conversation or self.blank_conversation())
                return
            if self.conversation.id is None:
                return
            saved = {c.id: c for c in self.store.conversations()}
            if self.conversation.id not in saved:  # deleted from the list
                await self.show_conversation(self.blank_conversation())
            else:  # perhaps renamed
                self.conversation.title = self.sub_title = saved[self.conversation.id].title

        self.push_screen(ConversationsDialog(self.store, self.conversation.id), chosen)

    def action_settings(self) -> None:
        if self.defaults is None:
            self.notify("settings open once the model is loaded", severity="warning")
            return

        def saved(settings: ConversationSettings | None) -> None:
            if settings is None:
                return
            self.conversation.settings = settings
            if self.conversation.id is not None:
                self.store.save_settings(self.conversation.id, settings)
            self.notify("settings saved for this conversation", timeout=3)

        self.push_screen(SettingsDialog(self.conversation.settings, self.sampling()), saved)

    async def action_regenerate(self) -> None:
        if not self.can_generate():
            return
        if not self.shown:
            self.notify("nothing to regenerate yet", severity="warning")
            return
        last = self.shown[-1]
        if last.message.role == "assistant":
            self.store.delete_message(last.message.id)
            self.shown.pop()
            await last.view.remove()
        await self.start_answer()

    def last_answer_text(self) -> str | None:
        """The last answer without its thinking."""
        answers = [s.message.content for s in self.shown if s.message.role == "assistant"]
        return split_thinking(answers[-1], final=True).answer if answers else None

    def copy(self, text: str, what: str) -> None:
        self.notify(f"{what}: {copy_text(self, text)}", timeout=3)

    def action_copy_answer(self) -> None:
        text = self.last_answer_text()
        if text is None:
            self.notify("no answer to copy yet", severity="warning")
        else:
            self.copy(text, "answer")

    def last_code_blocks(self) -> list[CodeBlock]:
        return code_blocks(self.last_answer_text() or "")

    def action_copy_code(self) -> None:
        blocks = self.last_code_blocks()
        if not blocks:
            self.notify("the last answer has no code block", severity="warning")
        else:
            self.copy(blocks[-1].code, f"code block {len(blocks)}")

    def action_toggle_keys(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New conversation", "Start a new conversation (Ctrl+N)",
                            self.action_new_chat)
        yield SystemCommand("Conversations", "Open, rename or delete saved conversations "
                            "(Ctrl+O)", self.action_conversations)
        yield SystemCommand("Settings", "System prompt, temperature, top-p, max new tokens "
                            "(Ctrl+S)", self.action_settings)
        yield SystemCommand("Regenerate", "Write the last answer again (Ctrl+R)",
                            self.action_regenerate)
        yield SystemCommand("Stop", "Stop the answer being written (Esc)", self.action_stop)
        yield SystemCommand("Copy answer", "Copy the last answer (Ctrl+T)",
                            self.action_copy_answer)
        for i, block in enumerate(self.last_code_blocks(), 1):
            yield SystemCommand(f"Copy code block {i}", block.label,
                                partial(self.copy, block.code, f"code block {i}"))
