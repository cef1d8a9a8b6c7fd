"""Data files shipped with llmrun. alice29.txt: the default text of `llmrun eval`
(public domain; provenance in NOTICE next to it and in docs/eval.md)."""
