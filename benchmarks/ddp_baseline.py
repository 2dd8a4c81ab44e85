"""Plain DDP baseline for the synchronous step-time row of ``benchmarks/run.py``.

The same model (``workers.models.build_model``), data (``workers.data.load_dataset``, the same
seeded train/validation split and IID shard per rank as the node trainer), batch size,
optimizer (SGD, momentum 0.9 as in the trainer) and world size as a synchronous run through
the server, but a plain script: ``torch.set_num_threads(1)``, ``DistributedDataParallel`` over
gloo with its default all-reduce, nothing else.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/ddp_baseline.py \\
        --dataset mnist-5k --architecture mlp --preset large --batch-size 64 --epochs 3

A step is timed exactly where the node trainer (``workers/training/sync.py``) times it: from
``zero_grad`` to the end of ``optimizer.step()``, including the in-memory batch gather
(``X[idx]``); per-epoch evaluation and start-up are outside, as in the trainer (which also
does them outside its step timer). Rank 0 prints one JSON object on stdout: every rank's
mean / median step time and steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.data import load_dataset, partition, train_val_split  # noqa: E402
from workers.models import TaskInfo, build_model  # noqa: E402
from workers.priority import autogroup_at_own_nice  # noqa: E402


def shard(name: str, rank: int, world: int, validation_split: float, seed: int,  # type: ignore[no-untyped-def]
          preset: str = "base"):
    """This rank's training shard, split as ``workers.training.setup.read_local`` splits it."""
    ds = load_dataset(name)
    if ds.kind == "lm":
        return lm_shard(ds, rank, world, validation_split, seed, preset)
    tr, _ = train_val_split(len(ds), validation_split, seed, stratify=ds.y)
    parts = partition(ds.y[tr], world, "iid", 0.5, seed)
    idx = tr[parts[rank]]
    X = torch.from_numpy(np.ascontiguousarray(ds.X[idx], dtype=np.float32))
    y = torch.from_numpy(np.asarray(ds.y[idx], dtype=np.int64))
    task = TaskInfo(ds.kind, tuple(ds.input_shape), len(ds.label_names))
    return X, y, task, [len(p) for p in parts]


def lm_shard(ds, rank: int, world: int, validation_split: float, seed: int,  # type: ignore[no-untyped-def]
             preset: str):
    """A language-modelling shard as the node trainer builds it: the byte-level BPE trained on every
    training document (what the workers' summed pre-token counts give), this rank's documents as one
    token stream, cut into windows of the trainer's sequence length."""
    from workers.data.bpe import BPETokenizer, pretoken_counts
    from workers.data.text import lm_windows
    from workers.models.gpt import requested_vocab_size
    from workers.training.setup import LM_SEQ_LEN

    tr, _ = train_val_split(len(ds), validation_split, seed)
    parts = partition(len(tr), world, "iid", 0.5, seed)
    counts = pretoken_counts(ds.subset(tr).X)  # the vocabulary rule of workers.training.setup.global_setup
    tokenizer = BPETokenizer.fit_counts(counts, requested_vocab_size(preset, None, sum(counts.values())))
    xi, yi = lm_windows(tokenizer.encode_stream(list(ds.subset(tr[parts[rank]]).X)), LM_SEQ_LEN)
    v = tokenizer.vocab_size
    task = TaskInfo("lm", (), v, v, LM_SEQ_LEN)
    return torch.from_numpy(xi), torch.from_numpy(yi), task, [len(xi)]  # main agrees on the smallest shard


def loss_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier (B, C) or of a language model over every position (B, L, V)."""
    if out.dim() == 3:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    return F.cross_entropy(out, target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist-5k")
    ap.add_argument("--architecture", default="mlp")
    ap.add_argument("--preset", default="large")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--validation-split", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainer-extras", action="store_true",
                    help="also do, inside the timed step, the per-step bookkeeping the node trainer does "
                         "(set the learning rate, count correct predictions, read the loss, total grad norm); "
                         "a diagnostic that separates that work from the framework's overhead")
    args = ap.parse_args()

    autogroup_at_own_nice()  # torchrun gave this rank an autogroup of its own, at nice 0
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    X, y, task, sizes = shard(args.dataset, rank, world, args.validation_split, args.seed, args.preset)
    torch.manual_seed(args.seed)
    model = build_model(args.architecture, args.preset, task)
    model.train()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    smallest = torch.tensor([min(sizes)])
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)  # every rank takes the same number of steps
    spe = int(smallest) // args.batch_size
    B = args.batch_size
    times: list[float] = []
    dist.barrier()
    t_run = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = np.random.default_rng([args.seed, epoch, rank]).permutation(len(X))
        for s in range(spe):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            idx = torch.from_numpy(order[s * B : (s + 1) * B])
            if args.trainer_extras:
                for g in opt.param_groups:
                    g["lr"] = args.lr
                out = ddp(X[idx])
                loss = loss_of(out, y[idx])
                with torch.no_grad():
                    int((out.argmax(dim=-1) == y[idx]).sum())
                loss.backward()
                float(loss.detach())
                float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(p.grad) for p in ddp.parameters() if p.grad is not None])))
            else:
                loss = loss_of(ddp(X[idx]), y[idx])
                loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    run_s = time.perf_counter() - t_run
    mine = {"rank": rank, "steps": len(times), "mean_step_ms": 1000 * statistics.fmean(times),
            "median_step_ms": 1000 * statistics.median(times),
            "median_after_warmup_ms": 1000 * statistics.median(times[min(10, len(times) - 1):]),
            "run_s": run_s, "final_loss": float(loss.detach()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        sys.stdout.write(json.dumps({
            "world_size": world, "dataset": args.dataset, "architecture": args.architecture,
            "preset": args.preset, "batch_size": B, "epochs": args.epochs, "steps_per_epoch": spe,
            "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "trainer_extras": args.trainer_extras, "ranks": gathered,
        }) + "\n")
        sys.stdout.flush()
    # Tear down in order: DDP's reducer first, then the group, after every rank is done
    # (destroying the group under a live DDP reducer sometimes aborts at exit).
    del ddp, opt
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with torch 2.13 a DDP process sometimes aborts there
    # ("terminate called without an active exception", SIGABRT) after all work is done and the
    # group is destroyed, which torchrun would report as a failed run.
    os._exit(code)
