"""`llmrun chat`: the Textual chat TUI (llmrun/chat). Textual and torch load inside run()."""

from __future__ import annotations

import argparse

from llmrun.cli.common import add_model_args, add_sampling_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Chat with a model in a terminal UI. Conversations are saved in SQLite under "
        "the user data directory ($LLMRUN_DATA_DIR or --data-dir to change it). Enter sends, "
        "Shift+Enter or Ctrl+J adds a line, Esc stops an answer, Ctrl+P lists every command.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default="", help="system prompt for new conversations")
    p.add_argument("--data-dir", default=None,
                   help="where chat.sqlite3 lives (default: $LLMRUN_DATA_DIR, else the platform's "
                   "user data directory for llmrun)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llmrun.chat.app import ChatApp
    from llmrun.chat.store import ChatStore, data_dir
    from llmrun.cli.loading import engine_options, sampling_settings
    from llmrun.runtime.engine import Engine

    store = ChatStore.open(data_dir(args.data_dir))
    try:
        app = ChatApp(
            store,
            load_engine=lambda progress: Engine.load(engine_options(args), progress),
            default_settings=lambda engine: sampling_settings(args, engine),
            system_prompt=args.system,
        )
        app.run()
    finally:
        store.close()
    return app.return_code or 0
