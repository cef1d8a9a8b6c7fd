"""llmrun: run quantized Llama and Gemma models fast on a CPU, from Python."""

__version__ = "0.1.0"
