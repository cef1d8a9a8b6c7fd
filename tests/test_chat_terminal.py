"""`llmrun chat` in a real terminal: tmux runs it with a temp data dir and the shipped model,
send-keys types a question, capture-pane shows what a person sees: the streamed answer and
the stats bar. Skipped, with the reason, where tmux is absent (CI installs it)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

TMUX = shutil.which("tmux")
STATS = re.compile(r"ttft \d+\.\d+s · prefill [\d.]+ t/s · decode [\d.]+ t/s · \d+ tokens")
QUESTION = "What is the capital of France?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y tmux): "
                       "the real-terminal chat test needs it"),
]


class Terminal:
    """A tmux server of its own (-L) with one 110x32 window."""

    def __init__(self, command: str):
        self.socket = f"llmrun-chat-test-{os.getpid()}"
        self.tmux("new-session", "-d", "-s", "chat", "-x", "110", "-y", "32",
                  f"{command}; echo EXITED $?; sleep 60")

    def tmux(self, *args: str) -> str:
        # COLUMNS/LINES (pytest sets them) would override the window's real size
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run([TMUX, "-L", self.socket, *args], check=True, text=True,
                              capture_output=True, env=env).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "chat")

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline or "EXITED" in text:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True)


def test_chat_streams_an_answer_in_tmux(tmp_path):
    command = (f"{shlex.quote(sys.executable)} -m llmrun chat --data-dir {shlex.quote(str(tmp_path))}"
               " --quant none --no-compile --max-new-tokens 8 --temperature 0")  # fp32 eager: fast load
    term = Terminal(command)
    try:
        term.wait_for(lambda s: " threads" in s, 150, "the model to load")
        term.tmux("send-keys", "-t", "chat", "-l", QUESTION)
        term.tmux("send-keys", "-t", "chat", "Enter")
        first = term.wait_for(lambda s: "writing..." in s or STATS.search(s), 60,
                              "the answer to start")
        assert f"You\n  {QUESTION}" in first  # the question, then the answer streaming in
        done = term.wait_for(lambda s: "writing..." not in s and STATS.search(s), 120,
                             "the answer and its stats")
        assert "Paris" in done
        assert "smollm2-135m · float32" in done
        assert "esc Stop" in done and "^p" in done  # the key footer
        term.tmux("send-keys", "-t", "chat", "C-q")
        term.wait_for(lambda s: "EXITED 0" in s, 30, "a clean exit")
    finally:
        term.close()
    with sqlite3.connect(tmp_path / "chat.sqlite3") as db:
        roles = [r[0] for r in db.execute("SELECT role FROM messages ORDER BY id")]
    assert roles == ["user", "assistant"]
