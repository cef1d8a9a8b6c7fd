"""Quality measures: perplexity over sliding windows, the same windows for every runtime."""
