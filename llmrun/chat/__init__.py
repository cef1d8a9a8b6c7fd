"""`llmrun chat`: a Textual chat TUI over the Engine. app.py is the screen and its actions;
store.py the SQLite history; context.py fits a conversation into the model's context;
widgets.py and dialogs.py the pieces on screen."""
