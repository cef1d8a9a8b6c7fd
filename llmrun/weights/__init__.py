"""Checkpoint readers. Each yields (config, stream of (hf_name, tensor)) so that weights
can be converted or quantized one tensor at a time, never all in memory at once."""
