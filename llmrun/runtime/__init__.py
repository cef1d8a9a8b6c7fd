"""Running a model: the load pipeline, the engine every front end uses, the single-stream
generator and the batched scheduler over a KV cache the runtime owns, per-request generation
state and sampling, and the compiled steps (AOTInductor packages, or torch.compile)."""
