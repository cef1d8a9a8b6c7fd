"""`llmrun chat`: the Textual chat TUI (llmrun/chat). Textual and torch load inside run()."""

from __future__ import annotations

import argparse

from llmrun.cli.common import add_model_args, add_sampling_args, add_template_args, template_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Chat with a model in a terminal UI. Conversations are saved in SQLite under "
        "the user data directory ($LLMRUN_DATA_DIR or --data-dir to change it). Enter sends, "
        "Shift+Enter or Ctrl+J adds a line, Esc stops an answer, Ctrl+P lists every command.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default="", help="system prompt for new conversations")
    add_template_args(p)
    p.add_argument("--server", default=None, metavar="URL",
                   help="chat with the model of a running `llmrun serve` (e.g. http://127.0.0.1:8000) "
                   "instead of loading one here; the model flags do not apply")
    p.add_argument("--api-key", default=None, help="the server's --api-key, for --server")
    p.add_argument("--data-dir", default=None,
                   help="where chat.sqlite3 lives (default: $LLMRUN_DATA_DIR, else the platform's "
                   "user data directory for llmrun)")
    p.set_defaults(run=run)


MODEL_FLAGS = ("model", "dtype", "threads", "quant", "group_size", "head", "weights", "int4", "kv_cache")


def run(args: argparse.Namespace) -> int:
    from llmrun.chat.app import ChatApp
    from llmrun.chat.store import ChatStore, data_dir
    from llmrun.cli.loading import engine_options, sampling_settings
    from llmrun.errors import LlmrunError

    if args.server:
        given = [f"--{flag.replace('_', '-')}" for flag in MODEL_FLAGS if getattr(args, flag) is not None]
        if given or args.no_compile:
            raise LlmrunError(f"--server chats with the server's model: leave out {', '.join(given) or '--no-compile'}")
        from llmrun.chat.remote import RemoteEngine

        load_engine = lambda progress: RemoteEngine.connect(args.server, args.api_key, progress)  # noqa: E731
    elif args.api_key:
        raise LlmrunError("--api-key is for --server")
    else:
        from llmrun.runtime.engine import Engine

        load_engine = lambda progress: Engine.load(engine_options(args), progress, background=True)  # noqa: E731
    store = ChatStore.open(data_dir(args.data_dir))
    try:
        app = ChatApp(
            store,
            load_engine=load_engine,
            default_settings=lambda engine: sampling_settings(args, engine),
            system_prompt=args.system,
            template_kwargs=template_kwargs(args),
        )
        app.run()
    finally:
        store.close()
    return app.return_code or 0
