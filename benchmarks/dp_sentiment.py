"""The accuracy cost of local differential privacy on the sentiment scenario, measured in one
process: the README's table in "Privacy" comes from here.

What runs: ``tweet-polarity``, the node trainer's seeded train/validation split (0.2) and its 4 IID
worker shards; each round every worker trains ``--local-epochs`` on its shard from the global
model, then the global model becomes the mean of the 4 workers' weights (FedAvg; the shards differ
by at most one record). The model is the server's own ``custom`` model (``workers.models``) with
the ``--layers`` given; the text goes through the server's word vocabulary (20,000 words) and
``max_len``, chosen as the nodes choose it. With ``--epsilon`` each worker runs DP-SGD with
the components the nodes use (``workers.training.private.LocalDP``): opacus' ``GradSampleModule``,
``DPOptimizer`` (per-example clipping to ``--max-grad-norm``, Gaussian noise) and Poisson batches
(``UniformWithReplacementSampler``, rate ``batch / shard``), the noise multiplier calibrated by
opacus' ``get_noise_multiplier`` to spend exactly ``--epsilon`` (delta 1e-5) over the run, and an
RDP accountant stepped by the optimizer reports what was spent.

    python benchmarks/dp_sentiment.py --epsilon 3 --optimizer sgd --lr 1 --batch-size 512 --local-epochs 10

Prints, as its last line, ``DP_SENTIMENT_JSON {...}`` (accuracy, F1 macro, noise multiplier, spent epsilon).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_LAYERS = [{"type": "embedding", "embedding_dim": 1}, {"type": "output"}]
DELTA = 1e-5


def shards(workers: int, seed: int):  # type: ignore[no-untyped-def]
    """(token ids, labels, worker index arrays, validation indices, vocabulary size)."""
    from collections import Counter

    import numpy as np
    import torch

    from workers.data import load_dataset, partition, train_val_split
    from workers.data.text import tokenize
    from workers.training.setup import VOCAB_SIZE, build_vocab, choose_max_len

    ds = load_dataset("tweet-polarity")
    tr, va = train_val_split(len(ds), 0.2, seed, stratify=ds.y)
    counts: Counter[str] = Counter()
    lengths: Counter[int] = Counter()
    for i in tr:
        tokens = tokenize(ds.X[i])
        counts.update(tokens)
        lengths[len(tokens)] += 1
    tok, max_len = build_vocab(counts, VOCAB_SIZE), choose_max_len(lengths)
    X = torch.as_tensor(tok.encode(list(ds.X), max_len))
    parts = [np.asarray(tr[p]) for p in partition(ds.y[tr], workers, "iid", 0.5, seed)]
    return X, torch.as_tensor(ds.y), parts, va, tok.vocab_size, max_len


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilon", type=float, default=None, help="local DP budget of the run (none: plain)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--layers", default=json.dumps(DEFAULT_LAYERS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from sklearn.metrics import f1_score

    from workers.models import TaskInfo
    from workers.models.layers import build_custom
    from workers.privacy import steps_per_epoch
    from workers.training.common import make_optimizer

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    X, y, parts, va, vocab, max_len = shards(args.workers, args.seed)
    torch.manual_seed(args.seed)
    model = build_custom("custom", TaskInfo("text", (), 2, vocab, max_len), json.loads(args.layers))
    smallest = min(len(p) for p in parts)
    q = args.batch_size / smallest  # the node's rate for the smallest shard, which spends the most
    steps = args.rounds * args.local_epochs * steps_per_epoch(q)
    sigma = (get_noise_multiplier(target_epsilon=args.epsilon, target_delta=DELTA, sample_rate=q, steps=steps,
                                  accountant="rdp") if args.epsilon else 0.0)
    accountants = [RDPAccountant() for _ in parts]  # one per worker, over all its rounds
    rng = np.random.default_rng(args.seed)
    for _ in range(args.rounds):
        states = []
        for part, accountant in zip(parts, accountants):
            local = copy.deepcopy(model)
            opt = make_optimizer(args.optimizer, local.parameters(), args.lr)
            if args.epsilon:
                rate = args.batch_size / len(part)
                module = GradSampleModule(local)
                dp_opt = DPOptimizer(opt, noise_multiplier=sigma, max_grad_norm=args.max_grad_norm,
                                     expected_batch_size=args.batch_size, loss_reduction="mean")
                dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
                for _ in range(args.local_epochs):
                    for batch in UniformWithReplacementSampler(num_samples=len(part), sample_rate=rate):
                        dp_opt.zero_grad(set_to_none=True)
                        if len(batch):
                            idx = torch.as_tensor(part[batch])
                            F.cross_entropy(module(X[idx]), y[idx]).backward()
                        else:  # an empty Poisson batch: a noise-only step, as the nodes do
                            for p in module.parameters():
                                p.grad_sample = torch.zeros(0, *p.shape)
                        dp_opt.step()
                module._close()
            else:
                for _ in range(args.local_epochs):
                    order = rng.permutation(part)
                    for s in range(0, len(order), args.batch_size):
                        idx = torch.as_tensor(order[s:s + args.batch_size])
                        opt.zero_grad(set_to_none=True)
                        F.cross_entropy(local(X[idx]), y[idx]).backward()
                        opt.step()
            states.append(local.state_dict())
        model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    with torch.no_grad():
        pred = model(X[va]).argmax(1).numpy()
    truth = y[va].numpy()
    # the session's epsilon: that of the worker that spends the most (disjoint shards)
    epsilon = max(a.get_epsilon(delta=DELTA) for a in accountants) if args.epsilon else None
    result = {"epsilon_target": args.epsilon, "epsilon_spent": epsilon,
              "noise_multiplier": sigma, "sample_rate": q, "dp_steps": steps if args.epsilon else 0,
              "val_accuracy": float((pred == truth).mean()),
              "val_f1_macro": float(f1_score(truth, pred, average="macro")),
              "majority_share": float(max(truth.mean(), 1 - truth.mean())), "seconds": time.perf_counter() - t0,
              "args": vars(args)}
    sys.stdout.write("DP_SENTIMENT_JSON " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
