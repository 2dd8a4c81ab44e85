"""One-process comparisons for the ``architectures`` row: the cluster's network trained centrally
(its twin) and a standard reference model, both on the train/validation split the cluster uses.

The twin goes through the node's own data pipeline (``read_local`` / ``global_setup`` /
``encode_local`` with one worker: the same seeded split, vocabulary, ``max_len`` and encoding a
cluster derives), ``build_model`` and the node's optimizer, learning-rate schedule and loss, in a
plain loop with no process group. Synchronous data parallel over W workers averages W batches'
gradients per step, so the twin steps with one batch of W x ``batch_size``.

References: for images the textbook conv32-pool-conv64-pool-linear CNN (torch); for feature
vectors a scikit-learn logistic regression; for text TF-IDF (words and bigrams) + logistic
regression.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

VALIDATION_SPLIT = 0.2  # the training tool's default, which every row uses
REFERENCE_CNN_EPOCHS = 3
REFERENCE_CNN = "conv32-pool-conv64-pool-linear CNN, Adam 1e-3, batch 64, 3 epochs"
REFERENCE_VECTORS = "scikit-learn logistic regression"
REFERENCE_TEXT = "TF-IDF (words + bigrams) + logistic regression"


def _plan(architecture: str, dataset: str, seed: int) -> Any:
    from workers.protocol import TrainJob
    from workers.training.setup import make_plan

    job = TrainJob(dataset=dataset, session_id="central", mode="sync", topology="mesh", architecture=architecture,
                   roles=["worker"], seed=seed, validation_split=VALIDATION_SPLIT)
    return make_plan(job, rank=0, world=1)


def train_twin(architecture: str, dataset: str, epochs: int, batch_size: int, learning_rate: float,
               workers: int = 2, seed: int = 0, optimizer: str = "adam") -> dict[str, Any]:
    """The cluster's network (preset base) trained on one process with the effective batch of
    ``workers`` synchronous workers; its validation accuracy on the cluster's validation split."""
    from workers.models import build_model
    from workers.training.common import batch_loss, epoch_order, evaluate, make_optimizer, set_lr
    from workers.training.schedule import lr_factor
    from workers.training.setup import encode_local, global_setup, read_local

    t0 = time.perf_counter()
    plan = _plan(architecture, dataset, seed)
    local, summary = read_local(plan, Path.cwd(), lambda _line: None)
    setup = global_setup(plan, [summary], None)
    data, _ = encode_local(local, setup)
    torch.manual_seed(seed)
    model = build_model(architecture, "base", setup.task)
    opt = make_optimizer(optimizer, model.parameters(), learning_rate)
    batch = batch_size * workers
    n = len(data.train)
    spe = max(1, n // batch)
    total = spe * epochs
    step = 0
    model.train()
    for epoch in range(1, epochs + 1):
        order = epoch_order(n, seed, epoch, 0)
        for s in range(spe):
            set_lr(opt, learning_rate * lr_factor(step, total))
            idx = torch.from_numpy(order[s * batch:(s + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss, *_ = batch_loss(model, data.train.X[idx], data.train.y[idx], setup.kind, False)
            loss.backward()
            opt.step()
            step += 1
    ev = evaluate(model, data.val, setup.kind, setup.task.num_classes)
    return {"val_accuracy": ev["correct"] / ev["count"], "n_train": n, "n_val": int(ev["count"]),
            "batch": batch, "steps": total, "seconds": round(time.perf_counter() - t0, 1)}


def split_of(dataset: str, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray]:
    """The dataset and the (train, validation) indices every cluster worker cuts its shard from."""
    from workers.data import load_dataset, train_val_split

    ds = load_dataset(dataset, Path.cwd())
    tr, va = train_val_split(len(ds), VALIDATION_SPLIT, seed, stratify=ds.y)
    return ds, tr, va


def _reference_cnn(X: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, classes: int,
                   seed: int) -> float:
    torch.manual_seed(seed)
    c, h, w = X.shape[1:]
    net = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xt, yt = torch.from_numpy(X[tr]), torch.from_numpy(y[tr])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(REFERENCE_CNN_EPOCHS):
        for idx in torch.randperm(len(tr), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(X[va])).argmax(1).numpy()
    return float((pred == y[va]).mean())


def train_reference(dataset: str, seed: int = 0) -> dict[str, Any]:
    """The standard model for the dataset's kind, trained on the cluster's training split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    ds, tr, va = split_of(dataset, seed)
    y = np.asarray(ds.y)
    if ds.kind == "images":
        name = REFERENCE_CNN
        acc = _reference_cnn(np.asarray(ds.X, dtype=np.float32), y, tr, va, len(ds.label_names), seed)
    elif ds.kind == "vectors":
        name = REFERENCE_VECTORS
        clf = LogisticRegression(max_iter=5000).fit(ds.X[tr], y[tr])
        acc = float(clf.score(ds.X[va], y[va]))
    elif ds.kind == "text":
        name = REFERENCE_TEXT
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        texts = list(ds.X)
        Xtr = vec.fit_transform([texts[i] for i in tr])
        clf = LogisticRegression(max_iter=5000, C=10.0).fit(Xtr, y[tr])
        acc = float(clf.score(vec.transform([texts[i] for i in va]), y[va]))
    else:
        raise ValueError(f"{dataset} is not a classification dataset")
    return {"model": name, "val_accuracy": acc, "n_train": len(tr), "n_val": len(va),
            "seconds": round(time.perf_counter() - t0, 1)}
