"""What weights are stored in: checkpoint readers (GGUF files and their block formats, Hugging
Face safetensors directories), each yielding (config, stream of (hf_name, tensor)) so weights
are converted or quantized one tensor at a time; the model built from such a stream
(checkpoint); and llmrun's own quantized directories (quantized_dir)."""
