"""Tensor parallel over torch.distributed, in gpt-fast's layout: q/k/v and gate/up split by
output rows (column-parallel), o_proj and down_proj by input columns (row-parallel, their
outputs summed over the ranks: two all-reduces a layer); the embedding, the norms and the head
are whole on every rank. Each rank streams the checkpoint and keeps only its share of each
tensor, so no rank ever holds the whole model.

The ranks are the processes torchrun starts (its RANK / WORLD_SIZE / MASTER_ADDR environment),
on the gloo backend. Every rank runs the same steps on the same tokens: the sums come out the
same on all of them, and so do the logits and (with one seed, chosen by rank 0) the samples."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch

from llmrun.errors import LlmrunError
from llmrun.kernels.blocks import BlockWeight

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# a rank that stops answering (it died, or hangs) ends the others' collectives after this long
TIMEOUT = timedelta(seconds=int(os.environ.get("LLMRUN_TP_TIMEOUT", "120")))


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int


def shard_from_env(tp: int) -> Shard:
    """This process's place among `tp` ranks started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world != tp:
        raise LlmrunError(f"--tp {tp} runs one process per rank: start it with "
                          f"`torchrun --nproc-per-node {tp} -m llmrun ...` (found WORLD_SIZE={world})")
    return Shard(int(os.environ["RANK"]), world)


def is_main() -> bool:
    """Whether this process speaks for the run: rank 0 under torchrun, or a single process."""
    return os.environ.get("RANK", "0") == "0"


def threads_per_rank() -> int:
    """The cores of this host shared among its ranks (torchrun's LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def join(shard: Shard) -> None:
    """Join the ranks' process group (gloo), once per process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world, timeout=TIMEOUT)


def local_config(cfg, world: int, group_size: int = 1):
    """The ModelConfig of one rank's share; LlmrunError naming what does not split.
    group_size: the weights' quantization groups along K, which a row-parallel split must keep
    whole (o_proj's K is the heads' width, down_proj's the feed-forward's)."""
    problems = []
    for what, n in (("attention heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads),
                    ("feed-forward units", cfg.ffn_dim)):
        if n % world:
            problems.append(f"its {n} {what} do not divide by {world}")
    for what, k in (("o_proj", cfg.n_heads * cfg.head_dim), ("down_proj", cfg.ffn_dim)):
        if not problems and (k // world) % group_size:
            problems.append(f"{what}'s {k} inputs split into {k // world}, not whole groups of {group_size}")
    if problems:
        raise LlmrunError(f"this model cannot split over {world} ranks: {'; '.join(problems)}")
    return replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                   ffn_dim=cfg.ffn_dim // world, tp_size=world)


def _rows(t, start: int, stop: int):
    return t.rows(start, stop) if isinstance(t, BlockWeight) else t[start:stop]


def _columns(t, start: int, stop: int):
    return t.columns(start, stop) if isinstance(t, BlockWeight) else t[:, start:stop]


def shard_tensor(name: str, tensor, shard: Shard):
    """This rank's share of checkpoint tensor `name` (model names, e.g. model.layers.0.mlp.up_proj.weight)."""
    module, _, kind = name.rpartition(".")
    part = module.rpartition(".")[2]
    if part in COLUMN_PARALLEL:
        n = tensor.shape[0] // shard.world
        return _rows(tensor, shard.rank * n, (shard.rank + 1) * n)
    if part in ROW_PARALLEL and kind == "weight":
        k = tensor.shape[1] // shard.world
        return _columns(tensor, shard.rank * k, (shard.rank + 1) * k)
    if part in ROW_PARALLEL:  # a bias is added once, after the sum
        return tensor if shard.rank == 0 else torch.zeros_like(tensor)
    return tensor


def shard_checkpoint(ckpt, shard: Shard, group_size: int = 1):
    """A formats.checkpoint.Checkpoint of this rank's share, streamed as the whole one is read."""
    from llmrun.formats.checkpoint import Checkpoint

    cfg = local_config(ckpt.config, shard.world, group_size)
    tensors = ((name, shard_tensor(name, t, shard)) for name, t in ckpt.tensors)
    return Checkpoint(cfg, tensors, ckpt.path)


def from_rank0(values: list[int] | None) -> list[int]:
    """Rank 0's list of integers (token ids, a seed) on every rank, sent as tensors (never
    pickled); the other ranks pass None."""
    import torch.distributed as dist

    count = torch.tensor([len(values) if values is not None else 0], dtype=torch.int64)
    dist.broadcast(count, src=0)
    data = torch.tensor(values, dtype=torch.int64) if values is not None else torch.empty(int(count), dtype=torch.int64)
    dist.broadcast(data, src=0)
    return data.tolist()


def shared_seed(seed: int | None) -> int:
    """One sampling seed for every rank: rank 0's (`seed`, or one it draws)."""
    mine = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    return from_rank0([mine] if is_main() else None)[0]


# A scheduler's steps under --tp: rank 0's scheduler decides each step (which sequences, which
# tokens, which slots) and announces it before running it; the other ranks run the same
# forward on their shares (follow), so the all-reduces inside meet. An announcement is two
# broadcasts of int64 tensors, (kind, B, T), then ids (B*T), positions (B*T) and slots (B), on
# a process group of their own whose timeout is long: the other ranks wait there for as long as
# the server is idle. An idle rank 0 announces "nothing" every HEARTBEAT, so that wait never
# reaches it; a rank 0 that dies closes its connections, which ends the wait at once.
_STOP, _PREFILL, _DECODE, _NOTHING = 0, 1, 2, 3
HEARTBEAT = timedelta(hours=1)
IDLE_TIMEOUT = timedelta(days=1)


def _steps_group():
    """The announcements' group (a collective: every rank makes it, once, at the same point)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class LeaderSteps:
    """Rank 0's scheduler steps (llmrun.runtime.scheduler's prefill_fn, decode_fn and on_stop),
    each announced to the other ranks before it runs; "nothing" while idle (HEARTBEAT)."""

    def __init__(self, prefill, decode):
        self._prefill, self._decode = prefill, decode
        self._group = _steps_group()
        self._lock = threading.Lock()  # one announcement at a time: a step's or the heartbeat's
        self._last = time.monotonic()
        self._stopped = threading.Event()
        threading.Thread(target=self._beat, name="llmrun-tp-heartbeat", daemon=True).start()

    def prefill(self, model, cache, ids, input_pos, slots):
        self._announce(_PREFILL, ids, input_pos, slots)
        return self._prefill(model, cache, ids, input_pos, slots)

    def decode(self, model, cache, ids, input_pos, slots):
        self._announce(_DECODE, ids, input_pos, slots)
        return self._decode(model, cache, ids, input_pos, slots)

    def stop(self) -> None:
        """The scheduler has stopped: so do the other ranks' follow() (unless they are gone)."""
        self._stopped.set()
        try:
            self._announce(_STOP)
        except RuntimeError:  # a rank that died closed its connection: nothing left to stop
            pass

    def _announce(self, kind: int, ids=None, input_pos=None, slots=None) -> None:
        import torch.distributed as dist

        B, T = ids.shape if ids is not None else (0, 0)
        with self._lock:
            dist.broadcast(torch.tensor([kind, B, T], dtype=torch.int64), src=0, group=self._group)
            if B:
                data = torch.cat([ids.reshape(-1), input_pos.reshape(-1), slots.reshape(-1)]).long()
                dist.broadcast(data, src=0, group=self._group)
            self._last = time.monotonic()

    def _beat(self) -> None:
        period = HEARTBEAT.total_seconds()
        while not self._stopped.wait(period / 4):
            if time.monotonic() - self._last >= period:
                self._announce(_NOTHING)


def follow(model, cache, prefill, decode) -> None:
    """On the ranks but 0: run each step rank 0's scheduler announces (LeaderSteps), with this
    rank's share of the model and a cache of the same slots and length, until it stops."""
    import torch.distributed as dist

    group = _steps_group()
    with torch.inference_mode():
        while True:
            head = torch.empty(3, dtype=torch.int64)
            dist.broadcast(head, src=0, group=group)
            kind, B, T = head.tolist()
            if kind == _STOP:
                return
            if kind == _NOTHING:
                continue
            data = torch.empty(2 * B * T + B, dtype=torch.int64)
            dist.broadcast(data, src=0, group=group)
            ids, input_pos, slots = data[:B * T].view(B, T), data[B * T:2 * B * T].view(B, T), data[2 * B * T:]
            (prefill if kind == _PREFILL else decode)(model, cache, ids, input_pos, slots)
