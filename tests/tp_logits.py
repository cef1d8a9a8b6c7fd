"""Run by torchrun in tests/test_tensor_parallel.py: each rank loads its share of every model in
the job file, and rank 0 writes the logits of the same tokens (safetensors, one per job)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmrun.formats.checkpoint import load_model, open_checkpoint
from llmrun.quant.transform import QuantTransform, prepare_int4_model
from llmrun.runtime import tensor_parallel


def build(job: dict, shard: tensor_parallel.Shard | None):
    """The job's model (float, int4, or a GGUF's blocks as shipped), whole or this rank's share."""
    as_shipped = job["quant"] == "as-shipped"
    path = Path(job["path"])
    ckpt = open_checkpoint(path, "gguf" if path.suffix == ".gguf" else "hf-dir", keep_blocks=as_shipped)
    if shard is not None:
        ckpt = tensor_parallel.shard_checkpoint(ckpt, shard, 32)
    model = load_model(ckpt, torch.float32, None if job["quant"] == "none" else QuantTransform(32))
    if job["quant"] != "none":
        prepare_int4_model(model)
    return model


def main(job_file: str, out_file: str) -> None:
    shard = tensor_parallel.Shard(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    tensor_parallel.join(shard)
    torch.set_num_threads(1)
    logits = {}
    for name, job in json.loads(open(job_file).read()).items():
        with torch.no_grad():
            logits[name] = build(job, shard)(torch.tensor([job["ids"]])).contiguous()
    if shard.rank == 0:
        save_file(logits, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
