"""Pilot tests of the chat TUI against a scripted engine: sending, streaming, Esc, multi-line
input, history in SQLite, settings, context overflow, errors, regenerate and copy."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time

import pytest

pytest.importorskip("textual")

from textual import events  # noqa: E402

from llmrun.chat.app import ChatApp  # noqa: E402
from llmrun.chat.context import fit_history  # noqa: E402
from llmrun.chat.dialogs import ConversationsDialog, SettingsDialog  # noqa: E402
from llmrun.chat.store import DB_NAME, ChatStore  # noqa: E402
from llmrun.chat.widgets import LoadPanel, MessageInput, MessageView, Notice, StatsBar  # noqa: E402
from llmrun.errors import LlmrunError  # noqa: E402
from llmrun.runtime.types import (  # noqa: E402
    ChatMessage, GenerationChunk, GenerationStats, LoadProgress, SamplingSettings)

SIZE = (100, 32)


class ScriptedEngine:
    """Engine's interface; each stream_generate call plays the next scripted reply (a list of
    text pieces, one token each) with a small sleep per token and honours the stop event.
    A token counts one per word of the rendered messages, so context tests are exact."""

    name = "scripted-model"
    quant_label = "int4 g32"
    threads = 2

    def __init__(self, replies=None, context_length=4096, delay=0.01, fail_after=None):
        self.replies = list(replies or [])
        self.context_length = context_length
        self.delay = delay
        self.fail_after = fail_after  # raise after this many tokens
        self.prompts: list[list[ChatMessage]] = []
        self.template_kwargs: list[dict | None] = []
        self.settings: list[SamplingSettings] = []

    def chat_prompt_ids(self, messages, template_kwargs=None):
        self.prompts.append(list(messages))
        self.template_kwargs.append(template_kwargs)
        n = sum(2 + len(m.content.split()) for m in messages) + 1
        return list(range(n))

    def stream_generate(self, prompt_ids, settings, stop=None):
        if len(prompt_ids) >= self.context_length:
            raise LlmrunError("prompt longer than the context")
        self.settings.append(settings)
        pieces = self.replies.pop(0) if self.replies else ["Hello", "!", " How", " can", " I",
                                                          " help", "?"]
        start = time.perf_counter()
        reason, n = "stop", 0
        for n, piece in enumerate(pieces[:settings.max_new_tokens], 1):
            if self.fail_after is not None and n > self.fail_after:
                raise RuntimeError("scripted failure")
            yield GenerationChunk(piece, token=n)
            if stop is not None and stop.wait(self.delay):
                reason = "cancelled"
                break
        else:
            if len(pieces) > settings.max_new_tokens:
                reason = "length"
        elapsed = time.perf_counter() - start
        yield GenerationChunk("", finished=True, stats=GenerationStats(
            prompt_tokens=len(prompt_ids), generated_tokens=n, ttft_s=0.005,
            prefill_tps=len(prompt_ids) / 0.005, decode_tps=n / max(elapsed, 1e-6),
            finish_reason=reason))


def make_app(tmp_path, engine=None, load_error=None, max_new_tokens=64, template_kwargs=None) -> ChatApp:
    def load(progress):
        progress(LoadProgress("load", 1, 2))
        if load_error is not None:
            raise load_error
        progress(LoadProgress("load", 2, 2))
        return engine

    return ChatApp(ChatStore.open(tmp_path),
                   load_engine=load,
                   default_settings=lambda e: SamplingSettings(max_new_tokens=max_new_tokens),
                   system_prompt="", template_kwargs=template_kwargs)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def wait_until(pilot, condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def ready(pilot):
    await wait_until(pilot, lambda: pilot.app.engine is not None, what="model ready")


async def send(pilot, text: str):
    box = pilot.app.query_one(MessageInput)
    box.focus()
    box.insert(text)
    await pilot.press("enter")


async def answered(pilot):
    await pilot.pause(0.01)
    await wait_until(pilot, lambda: pilot.app.answer is None, what="answer finished")
    await pilot.pause(0.05)


def db_rows(tmp_path, sql):
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        return db.execute(sql).fetchall()


def views(app, role=None):
    return [v for v in app.query(MessageView) if role is None or v.role == role]


# --- send and stream -------------------------------------------------------------------
def test_send_streams_markdown_answer_live_stats_and_saves(tmp_path):
    pieces = ["Here", " is", " code", ":\n\n", "```python\n", "print(", "'hi'", ")\n", "```\n"]
    engine = ScriptedEngine([pieces], delay=0.05)

    async def scenario():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            assert "scripted-model · int4 g32 · 2 threads" in str(app.query_one(StatsBar).render())
            await send(pilot, "show me code")
            await wait_until(pilot, lambda: app.answer is not None and app.answer.tokens >= 3,
                             what="streaming")
            live_view = views(app, "assistant")[-1]
            assert 0 < len(app.answer.text) < len("".join(pieces))  # partial while streaming
            assert "tokens" in str(app.query_one(StatsBar).render())  # live figures
            assert app.query_one(MessageInput).text == ""  # input cleared on send
            await answered(pilot)
            assistant = views(app, "assistant")[-1]
            assert assistant is live_view
            assert assistant.content == "".join(pieces).strip()
            assert assistant.markdown.source == assistant.content  # the full re-render
            assert assistant.query("MarkdownFence")  # the code block is a highlighted fence
            bar = str(app.query_one(StatsBar).render())
            assert "ttft 0.01s" in bar and "decode" in bar and f"{len(pieces)} tokens" in bar
            assert engine.prompts[-1] == [ChatMessage("user", "show me code")]
            assert app.sub_title == "show me code"

    run(scenario())
    assert db_rows(tmp_path, "SELECT role, content, finish_reason FROM messages") == [
        ("user", "show me code", ""), ("assistant", "".join(pieces).strip(), "stop")]
    assert db_rows(tmp_path, "SELECT title FROM conversations") == [("show me code",)]


def test_thinking_streams_open_then_folds_above_the_answer(tmp_path):
    """A reasoning model's <think> block shows live in an open fold, folds when the answer
    starts, and stays folded when the conversation is reopened; the stored message keeps it
    (the template decides what history keeps), copy takes the answer alone; the app's template
    variables reach every prompt."""
    from textual.widgets import Collapsible

    pieces = ["<think>", "\nThe", " capital", " is", " Paris", ".\n", "</think>", "\n\n", "Paris", "."]
    engine = ScriptedEngine([pieces], delay=0.05)

    async def scenario():
        app = make_app(tmp_path, engine, template_kwargs={"enable_thinking": True})
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "capital of France?")
            await wait_until(pilot, lambda: app.answer is not None and app.answer.tokens >= 4, what="thinking")
            fold = views(app, "assistant")[-1].query_one(Collapsible)
            assert not fold.collapsed and fold.title == "Thinking..."
            assert views(app, "assistant")[-1].markdown.source == ""
            await answered(pilot)
            view = views(app, "assistant")[-1]
            assert fold.collapsed and fold.title == "Thought (4 words)" and not fold.has_class("empty")
            assert str(view.query_one(".thinking-text").render()) == "The capital is Paris."
            assert view.markdown.source == "Paris."
            assert app.last_answer_text() == "Paris."
            assert engine.template_kwargs == [{"enable_thinking": True}]

    run(scenario())
    assert db_rows(tmp_path, "SELECT content FROM messages WHERE role = 'assistant'") == [("".join(pieces),)]

    async def reopened():
        app = make_app(tmp_path, ScriptedEngine())
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await pilot.press("ctrl+o")
            await pilot.pause(0.2)
            await pilot.press("enter")
            await wait_until(pilot, lambda: views(app, "assistant"), what="history shown")
            view = views(app, "assistant")[-1]
            assert view.query_one(Collapsible).collapsed and view.markdown.source == "Paris."
            assert not views(app, "user")[0].query(Collapsible)  # the user's text as is

    run(reopened())


def test_split_thinking_of_partial_and_prompt_opened_blocks():
    from llmrun.chat.thinking import Parts, split_thinking

    assert split_thinking("Paris.") == Parts(None, "Paris.", False)
    assert split_thinking("<thi") == Parts("", "", True)  # the tag arriving in pieces
    assert split_thinking("<thi", final=True) == Parts(None, "<thi", False)
    assert split_thinking("\n<think>\nhm") == Parts("hm", "", True)
    assert split_thinking("<think>\nhm", final=True) == Parts("hm", "", False)  # stopped while thinking
    assert split_thinking("hm\n</think>\n\nParis.") == Parts("hm", "Paris.", False)  # opened by the prompt


def test_escape_stops_at_once_keeps_partial_and_next_message_works(tmp_path):
    long = [f" word{i}" for i in range(400)]
    engine = ScriptedEngine([long, ["Fine", "."]], delay=0.05)

    async def scenario():
        app = make_app(tmp_path, engine, max_new_tokens=400)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "talk a lot")
            await wait_until(pilot, lambda: app.answer is not None and app.answer.tokens >= 3,
                             what="three tokens")
            await pilot.press("escape")
            assert app.answer is None  # stopped at once, not after the stream ends
            partial = views(app, "assistant")[-1]
            kept = partial.content
            assert kept.startswith("word0 word1 word2") and len(kept.split()) < 50
            assert partial.note_text == "stopped (Esc)"
            await pilot.pause(0.3)  # the worker's last token arrives late and is ignored
            assert partial.content == kept and partial.markdown.source == kept
            await send(pilot, "and now?")
            await answered(pilot)
            assert views(app, "assistant")[-1].content == "Fine."
            sent = engine.prompts[-1]
            assert [m.role for m in sent] == ["user", "assistant", "user"]
            assert sent[1].content == kept
            assert "(cancelled)" not in str(app.query_one(StatsBar).render())
        return kept

    kept = run(scenario())
    rows = db_rows(tmp_path, "SELECT role, content, finish_reason FROM messages")
    assert rows == [("user", "talk a lot", ""), ("assistant", kept, "cancelled"),
                    ("user", "and now?", ""), ("assistant", "Fine.", "stop")]


def test_view_follows_the_stream_only_at_the_bottom(tmp_path):
    lines = [f"line {i}\n\n" for i in range(60)]
    engine = ScriptedEngine([lines], delay=0.02)

    async def scenario():
        app = make_app(tmp_path, engine, max_new_tokens=400)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "count")
            t = app.transcript
            await wait_until(pilot, lambda: t.max_scroll_y > 5, what="overflowing transcript")
            assert t.scroll_y == t.max_scroll_y  # following
            t.scroll_home(animate=False, immediate=True)  # the user scrolls up
            await wait_until(pilot, lambda: app.answer.tokens > 30, what="more tokens")
            assert t.scroll_y == 0 and t.max_scroll_y > 20  # left where the user put it
            t.scroll_end(animate=False, immediate=True)  # back at the bottom: follows again
            await answered(pilot)
            await pilot.pause(0.2)
            assert t.scroll_y == t.max_scroll_y

    run(scenario())


# --- input ---------------------------------------------------------------------------
def test_shift_enter_ctrl_j_and_paste_add_lines(tmp_path):
    engine = ScriptedEngine()

    async def scenario():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            box = app.query_one(MessageInput)
            await pilot.press(*"one", "shift+enter", *"two", "ctrl+j", *"three")
            assert box.text == "one\ntwo\nthree" and not views(app)  # nothing sent yet
            app.post_message(events.Paste("\npasted a\npasted b"))  # as the driver does
            await pilot.pause(0.05)
            assert box.text == "one\ntwo\nthree\npasted a\npasted b" and not views(app)
            await pilot.press("enter")
            await answered(pilot)
            assert views(app, "user")[0].content == "one\ntwo\nthree\npasted a\npasted b"

    run(scenario())
    assert db_rows(tmp_path, "SELECT content FROM messages WHERE role = 'user'") == [
        ("one\ntwo\nthree\npasted a\npasted b",)]


# --- history -------------------------------------------------------------------------
def test_history_restored_on_reopen_then_rename_and_delete(tmp_path):
    async def first_session():
        app = make_app(tmp_path, ScriptedEngine([["Paris", "."]]))
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "capital of France?")
            await answered(pilot)

    async def second_session():
        engine = ScriptedEngine([["Berlin", "."]])
        app = make_app(tmp_path, engine)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            assert not views(app)  # a new chat to start with
            await pilot.press("ctrl+o")
            await wait_until(pilot, lambda: isinstance(app.screen, ConversationsDialog))
            await pilot.press("enter")
            await wait_until(pilot, lambda: len(views(app)) == 2, what="restored messages")
            assert [(v.role, v.content) for v in views(app)] == [
                ("user", "capital of France?"), ("assistant", "Paris.")]
            assert app.sub_title == "capital of France?"
            await send(pilot, "and of Germany?")
            await answered(pilot)
            assert [m.content for m in engine.prompts[-1]] == [
                "capital of France?", "Paris.", "and of Germany?"]
            # rename, then delete (d twice) from the list
            await pilot.press("ctrl+o")
            await wait_until(pilot, lambda: isinstance(app.screen, ConversationsDialog))
            await pilot.press("r")
            await pilot.pause(0.05)
            await pilot.press("ctrl+u", *"Capitals", "enter")  # ctrl+u: clear to line start
            await pilot.pause(0.05)
            assert db_rows(tmp_path, "SELECT title FROM conversations") == [("Capitals",)]
            await pilot.press("d")
            assert db_rows(tmp_path, "SELECT COUNT(*) FROM conversations") == [(1,)]
            await pilot.press("d")
            await pilot.pause(0.05)
            assert db_rows(tmp_path, "SELECT COUNT(*) FROM conversations") == [(0,)]
            await pilot.press("escape")
            await pilot.pause(0.05)
            assert not views(app) and app.conversation.id is None  # it was the open one

    run(first_session())
    run(second_session())
    assert db_rows(tmp_path, "SELECT COUNT(*) FROM messages") == [(0,)]


# --- settings ------------------------------------------------------------------------
def test_settings_dialog_saved_per_conversation_and_used(tmp_path):
    engine = ScriptedEngine([["a"], ["b", "c", "d", "e"]])

    async def scenario():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "first")
            await answered(pilot)
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: isinstance(app.screen, SettingsDialog))
            dialog = app.screen
            dialog.query_one("#system").load_text("You are terse.")
            dialog.query_one("#temperature").value = "abc"
            await pilot.press("ctrl+s")
            await pilot.pause(0.05)
            assert app.screen is dialog  # invalid: stays open with an error
            assert "numbers" in str(dialog.query_one("#error").render())
            dialog.query_one("#temperature").value = "0.3"
            dialog.query_one("#top_p").value = "0.5"
            dialog.query_one("#max_new_tokens").value = "2"
            await pilot.click("#save")
            await wait_until(pilot, lambda: not isinstance(app.screen, SettingsDialog))
            await send(pilot, "second")
            await answered(pilot)
            used = engine.settings[-1]
            assert (used.temperature, used.top_p, used.max_new_tokens) == (0.3, 0.5, 2)
            assert engine.prompts[-1][0] == ChatMessage("system", "You are terse.")
            assert views(app, "assistant")[-1].note_text == "stopped at max new tokens"

    run(scenario())
    assert db_rows(tmp_path, "SELECT system_prompt, temperature, top_p, max_new_tokens FROM "
                             "conversations") == [("You are terse.", 0.3, 0.5, 2)]


# --- context -------------------------------------------------------------------------
def test_context_overflow_drops_oldest_turns_with_notice(tmp_path):
    # context 40, 10 kept for the answer: 30 tokens of prompt; each turn here costs 2+4 + 2+2
    engine = ScriptedEngine([["ok", " then"]] * 5, context_length=40)

    async def scenario():
        app = make_app(tmp_path, engine, max_new_tokens=10)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            for i in range(4):
                await send(pilot, f"question number {i} here")
                await answered(pilot)
            notices = [n.text for n in app.query(Notice)]
            assert any("no longer fit in the context" in n for n in notices)
            sent = engine.prompts[-1]
            assert sent[0].content != "question number 0 here"  # oldest dropped
            assert sent[-1].content == "question number 3 here"
            assert sum(2 + len(m.content.split()) for m in sent) + 1 <= 30
            shown = views(app)
            assert "dropped" in shown[0].classes and "dropped" not in shown[-2].classes

    run(scenario())
    assert db_rows(tmp_path, "SELECT COUNT(*) FROM messages") == [(8,)]  # history kept whole


def test_fit_history_keeps_turns_whole_and_reports_full_context():
    engine = ScriptedEngine(context_length=20)
    history = [ChatMessage("user", "a b c"), ChatMessage("assistant", "d e"),
               ChatMessage("user", "f")]
    fitted = fit_history(engine, "", history, max_new_tokens=10)  # 1+5+4+3 = 13 > 10
    assert fitted.dropped == 2 and len(fitted.ids) == 4
    assert fit_history(engine, "", history, max_new_tokens=5).dropped == 0
    with pytest.raises(LlmrunError, match="context full"):
        fit_history(engine, "", [ChatMessage("user", "x " * 30)], max_new_tokens=5)


# --- errors --------------------------------------------------------------------------
def test_context_full_and_generation_failure_show_in_app(tmp_path):
    engine = ScriptedEngine([["partial", " text"], ["Recovered", "."]], context_length=30,
                            fail_after=1)

    async def scenario():
        app = make_app(tmp_path, engine, max_new_tokens=5)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "word " * 40)
            await pilot.pause(0.1)
            errors = [n.text for n in app.query(Notice) if "error" in n.classes]
            assert errors and "context full" in errors[-1]
            assert not views(app, "assistant") and app.answer is None
            await send(pilot, "short")
            await answered(pilot)
            errors = [n.text for n in app.query(Notice) if "error" in n.classes]
            assert "generation failed: RuntimeError: scripted failure" in errors[-1]
            engine.fail_after = None
            await send(pilot, "again")
            await answered(pilot)
            assert views(app, "assistant")[-1].content == "Recovered."
            assert app.is_running

    run(scenario())
    assert [r[0] for r in db_rows(tmp_path, "SELECT role FROM messages")] == [
        "user", "user", "user", "assistant"]


def test_model_load_failure_shows_and_app_stays_up(tmp_path):
    async def scenario():
        app = make_app(tmp_path, load_error=LlmrunError("model 'nope' not found: try `llmrun list`"))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.load_error is not None, what="load failure")
            await pilot.pause(0.05)
            panel = app.query_one(LoadPanel)
            assert "failed" in panel.classes
            assert "model 'nope' not found" in str(panel.query_one("#load-status").render())
            assert any("model 'nope' not found" in n.text for n in app.query(Notice))
            await send(pilot, "hello?")
            await pilot.pause(0.05)
            assert app.is_running and not views(app)
            assert app.query_one(MessageInput).text == "hello?"  # kept for later

    run(scenario())


# --- regenerate, copy, palette ---------------------------------------------------------
def test_regenerate_replaces_last_answer_and_copy_code_block(tmp_path, monkeypatch):
    engine = ScriptedEngine([["First", "."], ["Try:\n\n", "```sh\n", "ls -l\n", "```\n"]])
    copied = []
    monkeypatch.setitem(sys.modules, "pyperclip", None)  # no pyperclip: Textual's clipboard

    async def scenario():
        app = make_app(tmp_path, engine)
        monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "how to list files")
            await answered(pilot)
            await pilot.press("ctrl+r")
            await answered(pilot)
            assert [v.content for v in views(app, "assistant")] == ["Try:\n\n```sh\nls -l\n```"]
            await pilot.press("ctrl+b")
            await pilot.press("ctrl+t")
            titles = [c.title for c in app.get_system_commands(app.screen)]
            assert "Copy code block 1" in titles and "Settings" in titles

    run(scenario())
    assert copied == ["ls -l\n", "Try:\n\n```sh\nls -l\n```"]
    assert db_rows(tmp_path, "SELECT content FROM messages WHERE role = 'assistant'") == [
        ("Try:\n\n```sh\nls -l\n```",)]


def test_quit_while_streaming_stops_the_worker(tmp_path):
    engine = ScriptedEngine([[f" w{i}" for i in range(1000)]], delay=0.02)

    async def scenario():
        app = make_app(tmp_path, engine, max_new_tokens=1000)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "go")
            await wait_until(pilot, lambda: app.answer is not None and app.answer.tokens > 2)
            stop = app.answer.stop
            await pilot.press("ctrl+q")
        return stop

    assert run(scenario()).is_set()
