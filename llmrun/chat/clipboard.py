"""Copying text out of the app: pyperclip when it is installed and finds a clipboard, else
the terminal's own clipboard through Textual (OSC 52)."""

from __future__ import annotations

from dataclasses import dataclass

from markdown_it import MarkdownIt


@dataclass
class CodeBlock:
    language: str
    code: str

    @property
    def label(self) -> str:
        first = next((line.strip() for line in self.code.splitlines() if line.strip()), "")
        return f"{self.language or 'text'}: {first[:40]}"


def code_blocks(markdown: str) -> list[CodeBlock]:
    """The fenced and indented code blocks of a markdown text, in order."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [CodeBlock(t.info.strip().split(" ")[0] if t.info else "", t.content)
            for t in tokens if t.type in ("fence", "code_block")]


def copy_text(app, text: str) -> str:
    """Copy, and say how, for the notification."""
    try:
        import pyperclip
    except ImportError:
        pyperclip = None
    if pyperclip is not None:
        try:
            pyperclip.copy(text)
            return "copied to the clipboard"
        except pyperclip.PyperclipException:
            pass  # no clipboard program on this system: the terminal's clipboard below
    app.copy_to_clipboard(text)
    return "copied through the terminal (OSC 52)"
