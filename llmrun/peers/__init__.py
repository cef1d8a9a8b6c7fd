"""Other runtimes run beside llmrun on the same files and inputs, for side-by-side figures."""
