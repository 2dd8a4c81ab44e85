"""Job planning and data preparation, in two agreed phases.

Phase 1 (:func:`read_local`): every worker loads the dataset, makes the shared seeded
train/validation split and keeps only its shard (or, for a file inside its own sandbox, all
of it), and summarises what it holds: kind, shape, labels, sizes and -- for text -- token
counts and a histogram of text lengths. No raw example leaves the node.

Between the phases every rank derives the same vocabulary, ``max_len`` and task from the
gathered summaries (:func:`global_setup`): a word vocabulary for text classification, a
byte-level BPE tokenizer trained from the workers' pre-token counts for language modelling.

Phase 2 (:func:`encode_local`): workers encode their shard (token ids, LM windows) and report
sizes; for language modelling also unigram counts, from which every rank computes the same
unigram perplexity baseline.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.data import (
    Dataset,
    DatasetError,
    Tokenizer,
    lm_windows,
    load_dataset,
    load_tokenizer,
    partition,
    tokenize,
    train_val_split,
    unigram_perplexity,
)
from workers.data.bpe import BPETokenizer, pretoken_counts
from workers.models import TaskInfo, check_compatible
from workers.models.gpt import requested_vocab_size
from workers.protocol import AGGREGATING_CAPABILITIES, RAFT_NEEDS_FEDERATED, TrainJob

from .common import Split, TrainingError
from .consensus import resolve_rule

log = logging.getLogger(__name__)

VOCAB_SIZE = 20_000
"""Vocabulary of text classification tasks (most frequent training tokens)."""
LM_SEQ_LEN = 128
"""Tokens per language-modelling window (and the preset models' positions; a loaded model with a longer
context keeps it and is fine-tuned on windows of this length)."""
SHORT_TEXT_MAX_LEN = 40
LONG_TEXT_MAX_LEN = 256
SHORT_TEXT_P95 = 64
"""Texts whose 95th percentile length is at most this many tokens count as short (tweets)."""
MIN_TEXT_MAX_LEN = 16
MAX_LENGTH_BIN = 4096


# --------------------------------------------------------------------------- plan

BUILTIN_KINDS = {
    "digits": "vectors",
    "mnist-5k": "images",
    "tweet-sentiment": "text",
    "tweet-polarity": "text",
    "bbc-news": "text",
    "bbc-news-lm": "lm",
}
"""Kinds of the built-in datasets, known without loading them (for the early checks)."""


@dataclass
class Plan:
    """Who does what in this job; identical on every rank."""

    job: TrainJob
    world: int
    rank: int
    workers: list[int]
    ps: list[int]
    aggregator: int | None
    reporter: int
    active: list[int]
    validators: list[int] = field(default_factory=list)
    """Validator ranks that take part (federated proof-of-learning and raft)."""
    judges: list[int] = field(default_factory=list)
    """Ranks that evaluate candidate models on the validation split (proof-of-learning):
    the validators and the active ranks with the ``validation`` capability, or the aggregator
    when there is none."""
    checkpointer: int | None = None
    """The rank that writes the checkpoints: the first rank holding the global model with the
    ``checkpoint_creation`` capability, else the epoch judge, else the reporter."""
    epoch_judge: int | None = None
    """Sync and parameter-server runs: the dedicated aggregator (role ``aggregator``, no data) that
    validates each epoch's model, runs the commit rule on its figures and writes the checkpoints
    (:mod:`.epoch_judge`)."""

    @property
    def consensus(self) -> str:
        return getattr(self.job, "consensus", None) or "proof-of-learning"

    @property
    def is_judge(self) -> bool:
        return self.rank in self.judges

    @property
    def writes_checkpoints(self) -> bool:
        return self.rank == (self.reporter if self.checkpointer is None else self.checkpointer)

    @property
    def is_worker(self) -> bool:
        return self.rank in self.workers

    @property
    def worker_index(self) -> int:
        return self.workers.index(self.rank)

    @property
    def is_active(self) -> bool:
        return self.rank in self.active

    @property
    def role(self) -> str:
        return self.job.roles[self.rank]


def make_plan(job: TrainJob, rank: int, world: int) -> Plan:
    """Check the job's roles against the group and decide ranks per role (same on all ranks)."""
    if len(job.roles) != world:
        raise TrainingError(
            f"the job names {len(job.roles)} roles but the process group has {world} ranks; "
            "roles[rank] must be given for every rank"
        )
    workers = [r for r, role in enumerate(job.roles) if role == "worker"]
    ps = [r for r, role in enumerate(job.roles) if role == "parameter_server"]
    aggs = [r for r, role in enumerate(job.roles) if role == "aggregator"]
    dedicated = aggs[0] if aggs else None  # an aggregator node, not a worker with the capability
    vals = [r for r, role in enumerate(job.roles) if role == "validator"]
    consensus = getattr(job, "consensus", None) or "proof-of-learning"
    caps = [set(c) for c in (getattr(job, "capabilities", None) or [])] + [set()] * world

    def having(*names: str) -> list[int]:
        return [r for r in range(world) if caps[r] & set(names)]

    aggs = aggs or having(*AGGREGATING_CAPABILITIES)  # a node with an aggregating capability may aggregate
    aggregator = epoch_judge = None
    validators: list[int] = []
    judges: list[int] = []
    if consensus == "gossip" and job.mode != "federated":
        raise TrainingError("consensus 'gossip' averages models between neighbours after local training; "
                            "use it with federated training")
    if consensus == "raft" and job.mode != "federated":
        raise TrainingError(RAFT_NEEDS_FEDERATED.format(mode=job.mode))
    if job.mode == "federated":
        if not workers:
            raise TrainingError("federated training needs at least one node with role 'worker' to hold data; "
                                "add workers to the cluster")
        if consensus == "gossip":  # no central aggregator: aggregators (if any) just wait
            active = list(workers)
            reporter = workers[0]
        else:
            aggregator = aggs[0] if aggs else workers[0]
            if consensus in ("proof-of-learning", "raft"):
                validators = list(vals)
            active = sorted(set(workers) | {aggregator} | set(validators) | set(ps))  # PS hold the global model
            if consensus == "proof-of-learning":
                judges = sorted(set(vals) | {r for r in having("validation") if r in active}) or [aggregator]
            reporter = aggregator
            resolve_rule(job, len(workers))  # a rule that cannot work fails here, on every rank
    elif job.mode == "parameter_server":
        if not ps:
            raise TrainingError("parameter-server training needs at least one node with role "
                                "'parameter_server'; add one or use mode sync")
        if not workers:
            raise TrainingError("parameter-server training needs at least one node with role 'worker'; add workers")
        active = sorted(set(workers) | set(ps))
        reporter = workers[0]
        aggregator = epoch_judge = dedicated
    elif job.mode == "sync":
        if not workers:
            raise TrainingError("synchronous training needs at least one node with role 'worker'; add workers")
        active = list(workers)
        reporter = workers[0]
        if consensus == "byzantine":  # robust aggregation of gradients at a hub
            aggregator = aggs[0] if aggs else workers[0]
            active = sorted(set(workers) | {aggregator})
            resolve_rule(job, len(workers))
        else:
            aggregator = epoch_judge = dedicated
    else:
        raise TrainingError(f"unknown training mode {job.mode!r}; use sync, parameter_server or federated")
    builtin_kind = BUILTIN_KINDS.get(job.dataset.strip().lower().replace("_", "-"))
    if builtin_kind is not None:
        check_compatible(job.architecture, builtin_kind)  # before anything is loaded
    if epoch_judge is not None:
        active = sorted(set(active) | {epoch_judge})
        judges = [epoch_judge]
    holders = [] if consensus == "gossip" else [r for r in active if r not in ps]  # ranks holding the global model
    checkpointer = next((r for r in having("checkpoint_creation") if r in holders),
                        reporter if epoch_judge is None else epoch_judge)
    return Plan(job, world, rank, workers, ps, aggregator, reporter, active, validators, judges, checkpointer,
                epoch_judge)


# --------------------------------------------------------------------------- phase 1


@dataclass
class LocalData:
    """What a worker holds after phase 1 (raw examples of its shard only)."""

    name: str
    kind: str
    label_names: list[str]
    train: Dataset
    val: Dataset
    private: bool
    judge_val: Dataset | None = None
    """The whole validation split, kept by a rank that judges candidate models."""


def is_private_dataset(spec: str, sandbox: Path) -> bool:
    """A relative path (or glob) that exists inside this node's sandbox is this node's own data."""
    s = spec.strip()
    if not s or s.startswith("{") or os.path.isabs(os.path.expanduser(s)):
        return False
    try:
        if (Path(sandbox) / s).exists():
            return True
        return any(ch in s for ch in "*?[") and next(Path(sandbox).glob(s), None) is not None
    except (OSError, ValueError, NotImplementedError):
        return False


def _val_part(n_val: int, n_parts: int, index: int, seed: int) -> np.ndarray:
    """This worker's share of the validation split (possibly empty when it is tiny)."""
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919]).permutation(n_val)
    return np.sort(np.array_split(perm, n_parts)[index]).astype(np.int64)


def read_local(plan: Plan, sandbox: Path, say: Any) -> tuple[LocalData, dict[str, Any]]:
    """Phase 1 on a worker: load, split, shard; returns the data and its summary."""
    job = plan.job
    ds = load_dataset(job.dataset, sandbox)
    private = is_private_dataset(job.dataset, sandbox)
    labelled = ds.y is not None
    n_workers, index = len(plan.workers), plan.worker_index
    if len(ds) < 2:
        raise DatasetError(f"{ds.name}: {len(ds)} example(s); need at least 2 to train and validate")
    if private:
        tr, va = train_val_split(len(ds), job.validation_split, job.seed, stratify=ds.y if labelled else None)
        train_idx, val_idx = tr, va
    else:
        tr, va = train_val_split(len(ds), job.validation_split, job.seed, stratify=ds.y if labelled else None)
        if ds.kind == "lm" and job.partition == "dirichlet":
            raise DatasetError("dirichlet partitioning needs class labels and a language-modelling corpus has "
                               "none; use partition 'iid'")
        parts = partition(ds.y[tr] if labelled else len(tr), n_workers, job.partition, job.alpha, job.seed)
        train_idx = tr[parts[index]]
        val_idx = va[_val_part(len(va), n_workers, index, job.seed)]
    train, val = ds.subset(train_idx), ds.subset(val_idx)
    judge_val = ds.subset(va) if (plan.is_judge and len(va)) else None
    unit = "training documents" if ds.kind == "lm" else "training examples"
    where = "private file in this node's sandbox" if private else "private to this node"
    say(f"read shard {index + 1}/{n_workers} of {ds.name}: {len(train):,} {unit} ({where}); "
        f"{len(val):,} for validation")
    summary: dict[str, Any] = {
        "name": ds.name,
        "kind": ds.kind,
        "input_shape": list(ds.input_shape),
        "label_names": list(ds.label_names),
        "n_train": len(train),
        "n_val": len(val),
        "private": private,
        "judge_n_val": len(judge_val) if judge_val is not None else 0,
    }
    if ds.kind == "lm":  # pre-token counts: what the BPE tokenizer is trained from
        summary["counts"] = pretoken_counts(train.X)
    elif ds.kind == "text":
        counts: Counter[str] = Counter()
        lengths: Counter[int] = Counter()
        for text in train.X:
            toks = tokenize(text)
            counts.update(toks)
            lengths[min(len(toks), MAX_LENGTH_BIN)] += 1
        summary["counts"] = counts
        summary["lengths"] = lengths
    return LocalData(ds.name, ds.kind, list(ds.label_names), train, val, private, judge_val), summary


def read_validation(plan: Plan, sandbox: Path, say: Any) -> tuple[LocalData | None, dict[str, Any]]:
    """Phase 1 on a judge that holds no shard (a validator, or a dedicated aggregator): the
    dataset's validation split -- the same seeded split the workers cut theirs from. Never
    raises: a judge that cannot read the data (a file private to the workers) simply does
    not judge, and candidates are then judged on the workers' validation parts."""
    job = plan.job
    try:
        ds = load_dataset(job.dataset, sandbox)
        if len(ds) < 2:
            raise DatasetError(f"{ds.name}: too few examples")
        labelled = ds.y is not None
        _, va = train_val_split(len(ds), job.validation_split, job.seed, stratify=ds.y if labelled else None)
    except Exception as exc:
        log.info("this judge cannot read the dataset", exc_info=True)
        say(f"cannot read {job.dataset[:80]} here ({exc}); candidate models will be judged on the workers' "
            "validation parts")
        return None, {"judge_n_val": 0}
    val = ds.subset(va)
    say(f"holding the validation split of {ds.name} ({len(val):,} examples) to judge candidate models")
    empty = ds.subset(np.zeros(0, dtype=np.int64))
    return (LocalData(ds.name, ds.kind, list(ds.label_names), empty, empty, False, val if len(val) else None),
            {"judge_n_val": len(val)})


# --------------------------------------------------------------------------- between phases


@dataclass
class Setup:
    """Global facts every rank derives identically from the gathered summaries."""

    name: str
    kind: str
    task: TaskInfo
    tokenizer: Tokenizer | BPETokenizer | None
    label_names: list[str]
    max_len: int
    worker_train_sizes: list[int] = field(default_factory=list)
    unigram_ppl: float | None = None


def build_vocab(counts: Counter[str], vocab_size: int) -> Tokenizer:
    """Most frequent tokens first, ties broken alphabetically (same result on every rank)."""
    for s in Tokenizer.SPECIALS:
        counts.pop(s, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - len(Tokenizer.SPECIALS)]
    return Tokenizer(list(Tokenizer.SPECIALS) + words)


def choose_max_len(lengths: Counter[int]) -> int:
    """95th percentile of text lengths, rounded up to a multiple of 8 plus 8 tokens of
    headroom, capped at 40 for short texts (tweets) and 256 for long ones (articles)."""
    total = sum(lengths.values())
    if total == 0:
        return SHORT_TEXT_MAX_LEN
    need = 0.95 * total
    acc = 0
    p95 = 0
    for length in sorted(lengths):
        acc += lengths[length]
        if acc >= need:
            p95 = length
            break
    cap = SHORT_TEXT_MAX_LEN if p95 <= SHORT_TEXT_P95 else LONG_TEXT_MAX_LEN
    return int(min(cap, max(MIN_TEXT_MAX_LEN, -(-p95 // 8) * 8 + 8)))


def _merge_labels(summaries: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """The label names all workers share; True when local label ids must be remapped."""
    lists = [s["label_names"] for s in summaries]
    longest = max(lists, key=len)
    if all(lst == longest[: len(lst)] for lst in lists):
        return list(longest), False
    return sorted(set().union(*lists)), True


def global_setup(plan: Plan, summaries: list[dict[str, Any] | None], ckpt: dict[str, Any] | None) -> Setup:
    """Kind, labels, vocabulary, max_len and task; raises the same error on every rank."""
    job = plan.job
    mine = [summaries[r] for r in plan.workers]
    assert all(s is not None for s in mine)
    kinds = {s["kind"] for s in mine}
    if len(kinds) != 1:
        raise DatasetError(f"the workers' datasets are of different kinds ({', '.join(sorted(kinds))}); "
                           "every worker must hold the same kind of data")
    kind = kinds.pop()
    shapes = {tuple(s["input_shape"]) for s in mine}
    if len(shapes) != 1:
        raise DatasetError(f"the workers' datasets have different example shapes {sorted(shapes)}; they must match")
    input_shape = shapes.pop()
    name = mine[0]["name"]
    check_compatible(job.architecture, kind)
    label_names, _ = _merge_labels(mine) if kind != "lm" else ([], False)

    tokenizer: Tokenizer | BPETokenizer | None = None
    max_len = 0
    if ckpt is not None:
        ck_task = ckpt.get("task") or {}
        if ck_task.get("kind") != kind:
            raise TrainingError(f"checkpoint {job.resume_from} was trained on {ck_task.get('kind')!r} data, "
                                f"this job's dataset is {kind!r}")
        if ckpt.get("tokenizer"):
            tokenizer = load_tokenizer(ckpt["tokenizer"])
        if kind == "lm" and not isinstance(tokenizer, BPETokenizer):
            raise TrainingError(f"checkpoint {job.resume_from} is a language model of an older version of this "
                                "server (word-level vocabulary, hand-written transformer) that cannot be resumed; "
                                "train a new model without resume_from")
        max_len = int(ckpt.get("max_len") or 0)
        if kind != "lm":
            ck_labels = list(ckpt.get("label_names") or [])
            if ck_labels and ck_labels != label_names:
                if label_names == ck_labels[: len(label_names)]:
                    label_names = ck_labels
                else:
                    raise TrainingError(f"checkpoint {job.resume_from} has classes {ck_labels}, "
                                        f"the dataset has {label_names}")
    if kind in ("text", "lm") and tokenizer is None:
        counts: Counter[str] = Counter()
        for s in mine:
            counts.update(s["counts"])
        if kind == "lm":  # every rank trains the same BPE from the same summed counts
            vocab_size = requested_vocab_size(job.model, job.layers, sum(counts.values()))
            tokenizer = BPETokenizer.fit_counts(counts, vocab_size)
        else:
            tokenizer = build_vocab(counts, VOCAB_SIZE)
    if kind == "lm":  # training windows; a longer context a loaded model has is kept, not trained at that length
        max_len = min(max_len or LM_SEQ_LEN, LM_SEQ_LEN)
    elif kind == "text" and not max_len:
        lengths: Counter[int] = Counter()
        for s in mine:
            lengths.update({int(k): v for k, v in s["lengths"].items()})  # JSON made the keys strings
        max_len = choose_max_len(lengths)
    vocab = tokenizer.vocab_size if tokenizer is not None else 0
    num_classes = vocab if kind == "lm" else len(label_names)
    task = TaskInfo(kind, tuple(input_shape), num_classes, vocab, max_len)  # type: ignore[arg-type]
    return Setup(name, kind, task, tokenizer, label_names, max_len)


# --------------------------------------------------------------------------- phase 2


@dataclass
class Encoded:
    train: Split
    val: Split | None
    n_examples: int
    """Training examples (LM windows) this worker holds; its FedAvg weight."""


def _remap(y: np.ndarray, local: list[str], names: list[str]) -> np.ndarray:
    if local == names[: len(local)]:
        return y
    index = {n: i for i, n in enumerate(names)}
    table = np.asarray([index[n] for n in local], dtype=np.int64)
    return table[y]


def encode_local(local: LocalData, setup: Setup) -> tuple[Encoded, dict[str, Any]]:
    """Phase 2 on a worker: tensors of its shard and the sizes / counts to share."""
    kind = setup.kind
    info: dict[str, Any] = {}
    if kind == "lm":
        tok = setup.tokenizer
        assert tok is not None
        stream = tok.encode_stream(local.train.X)
        xi, yi = lm_windows(stream, setup.max_len)
        train = Split(torch.from_numpy(xi), torch.from_numpy(yi))
        val = None
        v = np.zeros(tok.vocab_size, dtype=np.int64)
        if len(local.val):
            vstream = tok.encode_stream(local.val.X)
            if vstream.size > setup.max_len:
                vx, vy = lm_windows(vstream, setup.max_len)
                val = Split(torch.from_numpy(vx), torch.from_numpy(vy))
                v = np.bincount(vy.reshape(-1), minlength=tok.vocab_size)
        info["train_counts"] = np.bincount(stream, minlength=tok.vocab_size)
        info["val_counts"] = v
        return Encoded(train, val, len(train)), {**info, "n_train": len(train), "n_val": len(val) if val else 0}

    def split_of(ds: Dataset) -> Split | None:
        if len(ds) == 0:
            return None
        assert ds.y is not None
        y = torch.from_numpy(_remap(np.asarray(ds.y), local.label_names, setup.label_names))
        if kind == "text":
            assert setup.tokenizer is not None
            X = torch.from_numpy(setup.tokenizer.encode(ds.X, setup.max_len))
        else:
            X = torch.from_numpy(np.ascontiguousarray(ds.X, dtype=np.float32))
        return Split(X, y)

    train = split_of(local.train)
    assert train is not None
    val = split_of(local.val)
    return Encoded(train, val, len(local.train)), {"n_train": len(train), "n_val": len(val) if val else 0}


def encode_validation(local: LocalData, setup: Setup) -> Split | None:
    """Phase 2 on a judge: its copy of the validation split encoded like the workers' parts
    (None when it holds none or it does not fit the task -- then it does not judge)."""
    ds = local.judge_val
    if ds is None or len(ds) == 0 or setup.kind != local.kind:
        return None
    try:
        if setup.kind == "lm":
            tok = setup.tokenizer
            assert tok is not None
            stream = tok.encode_stream(ds.X)
            if stream.size <= setup.max_len:
                return None
            vx, vy = lm_windows(stream, setup.max_len)
            return Split(torch.from_numpy(vx), torch.from_numpy(vy))
        assert ds.y is not None
        y = torch.from_numpy(_remap(np.asarray(ds.y), local.label_names, setup.label_names))
        if setup.kind == "text":
            assert setup.tokenizer is not None
            X = torch.from_numpy(setup.tokenizer.encode(ds.X, setup.max_len))
        else:
            X = torch.from_numpy(np.ascontiguousarray(ds.X, dtype=np.float32))
        return Split(X, y)
    except Exception:  # labels it cannot map, shapes that differ: leave the judging to others
        log.info("the judge's validation split does not fit the task", exc_info=True)
        return None


def finish_setup(plan: Plan, setup: Setup, infos: list[dict[str, Any] | None]) -> None:
    """Sizes per worker, the batch-size check and the LM unigram baseline (same on all ranks)."""
    job = plan.job
    sizes = [int(infos[r]["n_train"]) for r in plan.workers]  # type: ignore[index]
    setup.worker_train_sizes = sizes
    unit = "LM windows" if setup.kind == "lm" else "training examples"
    smallest = min(sizes)
    if job.batch_size > smallest:
        who = plan.workers[sizes.index(smallest)]
        raise TrainingError(
            f"batch_size {job.batch_size} is larger than the smallest training shard ({smallest} {unit} "
            f"on rank {who}); lower batch_size to at most {smallest} or use fewer workers"
        )
    if setup.kind == "lm":
        vocab = setup.task.vocab_size
        train_counts = sum(np.asarray(infos[r]["train_counts"]) for r in plan.workers)  # type: ignore[index]
        val_counts = sum(np.asarray(infos[r]["val_counts"]) for r in plan.workers)  # type: ignore[index]
        if int(np.sum(val_counts)) > 0:
            ids = np.arange(vocab, dtype=np.int64)
            setup.unigram_ppl = unigram_perplexity(np.repeat(ids, train_counts), np.repeat(ids, val_counts), vocab)
