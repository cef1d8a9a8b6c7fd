"""One module per `llmrun` subcommand; each exposes add_parser(subparsers)."""
