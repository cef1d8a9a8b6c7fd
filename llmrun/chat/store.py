"""Conversations and their messages in one SQLite file under the user's data directory.

All access happens on the UI thread; the generation worker hands its text back to it."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

DB_NAME = "chat.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    temperature REAL,
    top_p REAL,
    max_new_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


def data_dir(override: str | None = None) -> Path:
    """--data-dir, else $LLMRUN_DATA_DIR, else the platform's user data dir for llmrun."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("LLMRUN_DATA_DIR"):
        return Path(os.environ["LLMRUN_DATA_DIR"]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("llmrun"))


@dataclass
class ConversationSettings:
    """Saved per conversation; None means "the command line's / model's default"."""

    system_prompt: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None


@dataclass
class Conversation:
    id: int | None  # None until its first message is saved
    title: str = "New chat"
    updated: float = 0.0
    settings: ConversationSettings = field(default_factory=ConversationSettings)
    message_count: int = 0


@dataclass
class StoredMessage:
    id: int
    role: str  # "user" | "assistant"
    content: str
    finish_reason: str = ""  # assistant only: stop | length | context | cancelled


class ChatStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(SCHEMA)

    @classmethod
    def open(cls, directory: Path) -> "ChatStore":
        return cls(directory / DB_NAME)

    def close(self) -> None:
        self.db.close()

    def create_conversation(self, title: str, settings: ConversationSettings) -> Conversation:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO conversations (title, created, updated, system_prompt, temperature,"
                " top_p, max_new_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (title, now, now, settings.system_prompt, settings.temperature, settings.top_p,
                 settings.max_new_tokens))
        return Conversation(cur.lastrowid, title, now, settings)

    def conversations(self) -> list[Conversation]:
        """Most recently updated first."""
        rows = self.db.execute(
            "SELECT c.id, c.title, c.updated, c.system_prompt, c.temperature, c.top_p,"
            " c.max_new_tokens, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)"
            " FROM conversations c ORDER BY c.updated DESC, c.id DESC").fetchall()
        return [Conversation(r[0], r[1], r[2], ConversationSettings(*r[3:7]), r[7]) for r in rows]

    def rename(self, conversation_id: int, title: str) -> None:
        with self.db:
            self.db.execute("UPDATE conversations SET title = ? WHERE id = ?",
                            (title, conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def save_settings(self, conversation_id: int, settings: ConversationSettings) -> None:
        with self.db:
            self.db.execute(
                "UPDATE conversations SET system_prompt = ?, temperature = ?, top_p = ?,"
                " max_new_tokens = ? WHERE id = ?",
                (settings.system_prompt, settings.temperature, settings.top_p,
                 settings.max_new_tokens, conversation_id))

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self.db.execute(
            "SELECT id, role, content, finish_reason FROM messages WHERE conversation_id = ?"
            " ORDER BY id", (conversation_id,)).fetchall()
        return [StoredMessage(*r) for r in rows]

    def add_message(self, conversation_id: int, role: str, content: str,
                    finish_reason: str = "") -> StoredMessage:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, finish_reason, created)"
                " VALUES (?, ?, ?, ?, ?)", (conversation_id, role, content, finish_reason, now))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?",
                            (now, conversation_id))
        return StoredMessage(cur.lastrowid, role, content, finish_reason)

    def delete_message(self, message_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
