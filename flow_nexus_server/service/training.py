"""Training sessions: validate, start on every node, watch until done, keep the figures.

Nodes push their progress to the controller every second (service.telemetry); ``on_progress``
stores the reporting node's metric samples as a time series and tracks checkpoints. A session's
watcher is a thread owned by the service (not by the MCP request that started it): it reads the
pushed progress and ends the session when every node is done or one fails. It never judges a
node's liveness: the monitor does (service.monitor), and a lost node of a running session
reaches the watcher through ClusterService.on_node_lost, which fails, heals or hands raft over.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError
from sqlalchemy import func, select

from flow_nexus_server import replies as r
from flow_nexus_server.launchers.local import NODE_LOG
from flow_nexus_server.service.budget import check_training_memory
from flow_nexus_server.service.cluster_model import cluster_model, options_ignored
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.errors import Conflict, NextStep, NotFound, ServiceError
from flow_nexus_server.service.guide_view import distributed_config, guide_fields
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.service.paths import check_dataset_spec, sandbox_path, under_allowed_root
from flow_nexus_server.service.tensorboard import TENSORBOARD_DIR, TensorBoardLog
from flow_nexus_server.states import (
    ENDED_SESSION_STATES,
    LIVE_NODE_STATES,
    ClusterState,
    SessionState,
    move,
    transition,
)
from flow_nexus_server.store import Checkpoint, Cluster, MetricSample, Node, TrainingSession
from workers import protocol as p
from workers.privacy import layer_refusal as dp_layer_refusal
from workers.privacy import local_budget_refusal as dp_local_budget_refusal
from workers.privacy import session_refusal as privacy_refusal

log = logging.getLogger(__name__)

POLL_S = 0.5
MAX_RESTARTS = 3
# A survivor reports "connection closed by peer" about as soon as a peer dies; the monitor names
# the dead node within about a second (its process check). Wait this long for that verdict before
# failing the session on the survivor's error alone, so healing and raft can act on the node.
LOST_VERDICT_WAIT_S = 3.0
# Survivors that recovered a secure-aggregation round end their job at once; a monitor that judges by
# silent telemetry may name the dead worker later than the process check does: wait that long for it.
HANDOVER_VERDICT_WAIT_S = 60.0
# The survivors of a secure-aggregation round finish it without the lost worker (the rest of their
# local training, the dropout timeout, the unmasking) before the group re-forms around them.
SECAGG_ROUND_WAIT_S = 900.0
MAX_BACKOFF_S = 30.0  # longest wait between retries of a failing watcher pass
WATCH_GIVE_UP_S = 300.0  # a watcher failing this long marks its session failed


def training_options(args: dict[str, Any]) -> p.TrainOptions:
    """Training options arriving another way than a training call (a template's recipe and overrides),
    checked against the same model as a training call's, with its bounds."""
    try:
        options = p.TrainOptions.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors())
        raise ServiceError(f"training arguments are invalid: {problems}") from exc
    if refusal := p.architecture_refusal(options.architecture):
        raise ServiceError(refusal)
    return options


def start_message(continued: str | None, job: p.TrainJob, idle: dict[str, str]) -> str:
    """The start reply's sentence: a continuation says from where, idle nodes say why."""
    unit, total = ("rounds", job.rounds) if job.mode == "federated" else ("epochs", job.epochs)
    text = (f"training started, continuing session {continued} from its last checkpoint up to {total} {unit}"
            if continued else "training started")
    for node_id, why in idle.items():
        text += f"; {node_id} takes no part: {why}"
    if job.secure_aggregation and job.consensus == "proof-of-learning":
        text += ("; secure aggregation hides each update, so proof-of-learning judges only the aggregate "
                 "(no update is left out on its own)")
    return text


@dataclass
class NodeView:
    node: Node
    cursor: int = 0
    snapshot: p.TrainProgress | None = None
    job: int | None = None  # the node's job number for this session (None: take the first pushed)


@dataclass
class LiveSession:
    session_id: str
    cluster_id: str
    mode: str
    started: float
    nodes: list[NodeView]
    status: SessionState = SessionState.RUNNING
    ended: float | None = None  # time.time() when the session ended: elapsed stops there
    error: str | None = None
    stop_requested: bool = False
    rescale: str | None = None  # nodes joined or left while running: re-form at the next boundary (what happened)
    leaving: dict[str, Node] = field(default_factory=dict)  # nodes removed while running: stopped at that boundary
    last_event_epoch: int = 0
    job: p.TrainJob | None = None
    lost: Node | None = None  # the node whose loss ended (or interrupted) the session
    restarts: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    lost_seen: threading.Event = field(default_factory=threading.Event)  # set with ``lost``
    lock: threading.Lock = field(default_factory=threading.Lock)  # pushes vs. a restart swapping nodes
    epoch_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # the reporter's, per epoch/round

    def reporter(self) -> NodeView | None:
        return next((v for v in self.nodes if v.snapshot and v.snapshot.reporter), None)

    def view(self) -> r.TrainingLive:
        rep = self.reporter()
        snap = rep.snapshot if rep else None
        progress = snap.progress if snap else 0.0
        elapsed = (self.ended or time.time()) - self.started
        eta = elapsed / progress * (1 - progress) if 0 < progress < 1 and self.status == SessionState.RUNNING else None
        return r.TrainingLive(
            session_id=self.session_id, status=self.status, mode=self.mode,
            epoch=snap.epoch if snap else 0, total_epochs=snap.total_epochs if snap else 0,
            step=snap.step if snap else 0, total_steps=snap.total_steps if snap else 0,
            progress_pct=round(100 * progress, 1), elapsed_s=round(elapsed, 2),
            eta_s=round(eta, 1) if eta is not None else None,
            metrics=dict(snap.latest) if snap else {},
            nodes={v.node.id: {**v.snapshot.node_stats} for v in self.nodes if v.snapshot},
            checkpoints=list(snap.checkpoints) if snap else [], error=self.error, restarts=self.restarts,
            consensus=self._consensus_figures(), reputation=self._reputation(),
        )

    CONSENSUS_KEYS: ClassVar[tuple[str, ...]] = ("rejected_rounds", "rejected_updates", "excluded_updates",
                                                 "raft_term", "raft_commit_index", "model_spread")

    def _consensus_figures(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for v in self.nodes:
            if v.snapshot:
                for source in (v.snapshot.node_stats, v.snapshot.latest if v.snapshot.reporter else {}):
                    out.update({k: val for k, val in source.items() if k in self.CONSENSUS_KEYS})
        return out

    def _reputation(self) -> dict[str, float]:
        by_rank = {v.node.rank: v.node.id for v in self.nodes}
        out: dict[str, float] = {}
        for v in self.nodes:
            for key, val in (v.snapshot.node_stats if v.snapshot else {}).items():
                if key.startswith("reputation_rank"):
                    rank = int(key.removeprefix("reputation_rank"))
                    if rank in by_rank:
                        out[by_rank[rank]] = val
        return out


def session_totals(live: LiveSession) -> dict[str, Any]:
    """What a whole session did, from the controller's memory: epochs, steps, samples, time, final loss."""
    view = live.view()
    samples = sum(stats.get("samples_processed", 0.0) for stats in (view.nodes or {}).values())
    return {"total_epochs": view.epoch, "total_steps": view.step, "samples_processed": samples,
            "final_loss": view.metrics.get("val_loss", view.metrics.get("loss")),
            "final_perplexity": view.metrics.get("val_perplexity"), "training_time_s": view.elapsed_s}


def boundary_wait_s(live: LiveSession) -> float:
    """How long the members may take to reach their next boundary after a stop request: a federated
    round ends only when its local training does, so three of the session's measured epochs / rounds
    (elapsed time over epochs begun), at least 120 s."""
    view = live.view()
    return max(120.0, 3.0 * view.elapsed_s / max(1, view.epoch))


class TrainingService:
    def __init__(self, clusters: ClusterService) -> None:
        self.clusters = clusters
        self.store = clusters.store
        self.live: dict[str, LiveSession] = {}
        self.by_cluster: dict[str, str] = {}  # cluster_id -> most recent session_id
        self._closed = threading.Event()
        self.tensorboard = TensorBoardLog(clusters.settings.home / TENSORBOARD_DIR)
        clusters.telemetry.on_progress = self.on_progress
        clusters.on_node_lost.append(self._node_lost)
        clusters.on_training_membership.append(self._membership_changed)
        clusters.on_training_leave.append(self._leave_at_boundary)

    # ------------------------------------------------------------------ start
    def start_from_dict(self, cluster_id: str, args: dict[str, Any]) -> r.TrainStartReply:
        return self.start(cluster_id, training_options(args))

    def start(self, cluster_id: str, req: p.TrainOptions) -> r.TrainStartReply:
        svc = self.clusters
        limits = svc.settings.limits
        if req.epochs > limits.max_epochs or (req.rounds or 0) > limits.max_epochs:
            raise ServiceError(f"epochs/rounds {max(req.epochs, req.rounds or 0)} is above this server's limit of "
                               f"{limits.max_epochs} (FLOW_NEXUS_MAX_EPOCHS)")
        if req.batch_size > limits.max_batch_size:
            raise ServiceError(f"batch_size {req.batch_size} is above this server's limit of {limits.max_batch_size} "
                               "(FLOW_NEXUS_MAX_BATCH_SIZE)")
        asked_dataset = req.dataset
        if in_sandbox := sandbox_path(req.dataset, svc.settings.allowed_roots):
            req = req.model_copy(update={"dataset": in_sandbox})  # the same path inside each node's sandbox
        check_dataset_spec(req.dataset, svc.settings.allowed_roots, limits.max_inline_dataset_bytes)
        dataset, epochs, batch_size, federated = req.dataset, req.epochs, req.batch_size, req.federated
        learning_rate, optimizer, local_epochs = req.learning_rate, req.optimizer, req.local_epochs
        with svc.lock(cluster_id):
            cluster = svc.get_cluster(cluster_id)
            if cluster.status == ClusterState.TRAINING:
                raise Conflict(f"cluster {cluster_id} is already training session {self.by_cluster.get(cluster_id)}",
                               next_step=NextStep.STOP_TRAINING)
            if cluster.status != ClusterState.CONNECTED:
                raise ServiceError(f"cluster {cluster_id} is not connected (status {cluster.status})",
                                   next_step=NextStep.CONNECT)
            nodes = sorted(svc.store.nodes(cluster_id), key=lambda n: n.rank if n.rank is not None else 1 << 30)
            if any(n.generation != cluster.generation or n.rank is None for n in nodes):
                raise ServiceError(f"the nodes of cluster {cluster_id} are not all in generation {cluster.generation}",
                                   next_step=NextStep.CONNECT)
            roles = [n.role for n in nodes]
            trainers = [n for n in nodes if n.role == "worker" and "training" in n.capabilities]
            if not trainers:
                what = "federated training" if federated else "training"
                raise ServiceError(f"{what} needs at least one worker node with the 'training' capability; "
                                   f"cluster {cluster_id} has roles {sorted(set(roles))}",
                                   next_step=NextStep.DEPLOY_WORKERS)
            mode = "federated" if federated else ("parameter_server" if "parameter_server" in roles else "sync")
            arch = req.architecture or cluster.architecture
            preset, layers, ignored = cluster_model(nodes, trainers)
            ignored |= options_ignored(req, mode)
            resume = self._resolve_resume(req.resume_from)
            rounds = req.rounds or epochs
            if req.continue_session:
                if req.resume_from:
                    raise ServiceError("give continue_session or resume_from, not both: continue_session resumes "
                                       "from that session's last checkpoint")
                resume, done = self._continue_from(req.continue_session)
                epochs, rounds = done + epochs, done + rounds
            session_id = "train_" + secrets.token_hex(6)
            job = p.TrainJob(
                **req.model_dump(include=set(p.JobOptions.model_fields)) | {"resume_from": resume, "epochs": epochs},
                session_id=session_id, mode=mode, topology=cluster.connected_topology or cluster.topology,
                architecture=arch, model=preset, layers=layers, rounds=rounds, roles=roles,
                consensus=req.consensus or cluster.consensus,
                behaviors=[p.Behavior(**(n.options.get("behavior") or {})) for n in nodes],
                capabilities=[list(n.capabilities) for n in nodes],
                sandbox_quota_bytes=limits.max_sandbox_bytes,  # checkpoints count toward it
            )
            if job.consensus == "gossip" and mode != "federated":
                raise ServiceError("consensus 'gossip' averages models between neighbours after local training; "
                                   "use it with federated=true")
            if refusal := privacy_refusal(job, len(trainers)):
                raise ServiceError(refusal)
            if job.consensus == "raft" and mode != "federated":
                raise ServiceError(p.RAFT_NEEDS_FEDERATED.format(mode=mode))
            checks = parallel(lambda n: svc.client(cluster, n).validate_job(job), trainers)
            for node, check in zip(trainers, checks):
                if isinstance(check, BaseException):
                    raise ServiceError(f"node {node.id} could not check the job: {check}")
                if not check.ok and in_sandbox:
                    roots = ", ".join(map(str, svc.settings.allowed_roots))
                    raise ServiceError(f"dataset {asked_dataset} is outside the allowed roots ({roots}), so it names "
                                       f"{in_sandbox} in each node's sandbox, and node {node.id} cannot read it "
                                       f"there: {check.error}", next_step=NextStep.UPLOAD)
                if not check.ok:
                    raise ServiceError(check.error or f"node {node.id} cannot run this job")
                check_training_memory(node, check, job, svc.settings)
            data = checks[0]
            if refusal := dp_layer_refusal(job, data.kind, data.input_shape, data.num_classes):
                raise ServiceError(refusal)
            shards = [int(c.examples * (1 - job.validation_split)) // (1 if c.private else len(trainers))
                      for c in checks]  # type: ignore[union-attr]
            if refusal := dp_local_budget_refusal(job, min(shards), max(shards)):
                raise ServiceError(refusal)
            started = parallel(lambda n: svc.client(cluster, n).start_training(job), nodes)
            failures = [f"{n.id}: {res}" for n, res in zip(nodes, started) if isinstance(res, BaseException)]
            if failures:
                parallel(lambda n: svc.client(cluster, n).stop_training(), nodes)
                raise ServiceError("starting the session failed on " + "; ".join(failures))
            config = r.TrainConfig(
                epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
                federated=federated, mode=mode, topology=job.topology, architecture=arch, model=job.model,
                dataset=dataset if len(dataset) <= 200 else dataset[:200] + "...", rounds=job.rounds,
                local_epochs=local_epochs,
                extra={"quantization": req.quantization.model_dump() if req.quantization else None}
                | job.model_dump(exclude={"session_id", "mode", "topology", "dataset", "architecture", "model",
                                          "epochs", "batch_size", "learning_rate", "optimizer", "rounds",
                                          "local_epochs", "roles", "layers"}),
            )
            with self.store.session() as s:
                s.add(TrainingSession(id=session_id, cluster_id=cluster_id, status=SessionState.RUNNING,
                                      config=config.model_dump(), created_at=time.time()))
                c = s.get(Cluster, cluster_id)
                move(c, ClusterState.TRAINING)
                # The nodes will hold this session's model, no longer a registry release.
                c.options = {**{k: v for k, v in c.options.items() if k != "serving_release"},
                             "quantization": req.quantization.model_dump() if req.quantization else None}
            views = [NodeView(n, job=t.job) for n, t in zip(nodes, started)]  # type: ignore[union-attr]
            live = LiveSession(session_id, cluster_id, mode, time.time(), views, job=job)
            self.live[session_id] = live
            self.by_cluster[cluster_id] = session_id
            self.tensorboard.start(session_id, config.model_dump())
            idle = {n.id: why for n in nodes if (why := p.idle_role_reason(n.role, mode, job.consensus))}
            svc.event(cluster_id, "session_started",
                      f"{mode} training on {len(trainers)} worker(s): {data.dataset} ({data.examples} examples), "
                      f"{arch}",
                      session_id=session_id)
            for node_id, why in idle.items():
                svc.event(cluster_id, "node_idle", f"{node_id} takes no part in session {session_id}: {why}",
                          session_id=session_id)
            threading.Thread(target=self._watch, args=(live,), name=f"watch-{session_id}", daemon=True).start()
        return r.TrainStartReply(
            success=True, session_id=session_id, cluster_id=cluster_id, status=SessionState.RUNNING,
            nodes_training=len(trainers), roles={n.id: n.role for n in nodes}, config=config,
            distributed_config=distributed_config(job, roles, {i for i, n in enumerate(nodes) if n.id in idle},
                                                  len(trainers)),
            data=data.model_dump(exclude={"ok", "error"}),
            message=start_message(req.continue_session, job, idle), ignored=ignored,
        )

    def _continue_from(self, session_id: str) -> tuple[str, int]:
        """(the last checkpoint's path, the epochs / rounds it covers) of a finished session."""
        with self.store.session() as s:
            row = s.get(TrainingSession, session_id)
            if row is None:
                raise NotFound(f"continue_session {session_id!r}: no such training session",
                               next_step=NextStep.FIND_SESSION)
            if row.status not in ENDED_SESSION_STATES:
                raise Conflict(f"session {session_id} is still {row.status}; wait for it to end (or stop it) "
                               "before continuing it", next_step=NextStep.STOP_TRAINING)
            last = s.scalars(select(Checkpoint).where(Checkpoint.session_id == session_id,
                                                      Checkpoint.deleted.is_(False))
                             .order_by(Checkpoint.epoch.desc(), Checkpoint.created_at.desc())).first()
            if last is None or not Path(last.path).is_file():
                raise ServiceError(f"session {session_id} left no checkpoint to continue from",
                                   next_step=NextStep.LIST_CHECKPOINTS)
            return str(Path(last.path).resolve()), int(last.epoch)

    def _resolve_resume(self, resume: str | None) -> str | None:
        if not resume:
            return None
        with self.store.session() as s:
            ckpt = s.get(Checkpoint, resume)
        path = Path(ckpt.path) if ckpt else under_allowed_root(resume, self.clusters.settings.allowed_roots,
                                                                "resume_from")
        if not (path.is_file() or (path / "config.json").is_file()):
            raise ServiceError(f"resume_from {resume!r} is neither a checkpoint id, an existing checkpoint file nor a "
                               "Hugging Face model directory", next_step=NextStep.LIST_CHECKPOINTS)
        return str(path.resolve())

    # ------------------------------------------------------------------ watch
    def _watch(self, live: LiveSession) -> None:
        """Follow the session until it ends. A failing pass (a database error, a node answering
        nonsense) is logged and retried with a back-off, never ending the server or the nodes;
        after WATCH_GIVE_UP_S of nothing but failures the session is marked failed."""
        failing_since: float | None = None
        delay = POLL_S
        while not self._closed.is_set():
            try:
                if self._watch_once(live):
                    return
                failing_since, delay = None, POLL_S
            except Exception as exc:
                failing_since = failing_since or time.time()
                delay = min(delay * 2, MAX_BACKOFF_S)
                log.exception("watching session %s failed; retrying in %.0f s", live.session_id, delay)
                if time.time() - failing_since > WATCH_GIVE_UP_S:
                    self._give_up(live, exc)
                    return
            time.sleep(delay)

    def _watch_once(self, live: LiveSession) -> bool:
        """One look at the session's pushed progress; True once the session has ended."""
        cluster = self.clusters.get_cluster(live.cluster_id, active=False)
        states = [v.snapshot.state if v.snapshot else p.JobState.PREPARING for v in live.nodes]
        failed = next((v for v in live.nodes if v.snapshot and v.snapshot.state == p.JobState.FAILED), None)
        if live.error is None and failed is not None:
            # A survivor often reports "connection closed by peer" before the monitor has named
            # the node that died: wait for that verdict, so healing/takeover can act on it.
            handover = p.SECAGG_HANDOVER in (failed.snapshot.error or "")
            live.lost_seen.wait(HANDOVER_VERDICT_WAIT_S if handover else LOST_VERDICT_WAIT_S)
            self._fail(live, f"node {failed.node.id} ({failed.node.role}) failed: {failed.snapshot.error}")
        if live.error is not None:
            can_restart = live.lost is not None and live.restarts < MAX_RESTARTS and not live.stop_requested
            if can_restart and self._secagg_dropout(live, cluster):
                return False
            if can_restart and cluster.auto_healing and self._heal(live, cluster):
                return False
            if can_restart and live.job is not None and live.job.consensus == "raft" \
                    and live.job.mode == "federated" and self._raft_takeover(live, cluster):
                return False
            self._finish(live, cluster, SessionState.FAILED)
            return True
        if live.rescale and not live.stop_requested and not any(s in p.ENDED_JOB_STATES for s in states):
            return self._rescale(live, cluster)
        if all(s in p.ENDED_JOB_STATES for s in states):
            stopped = p.JobState.STOPPED in states
            self._finish(live, cluster, SessionState.STOPPED if stopped else SessionState.COMPLETED)
            return True
        return False

    def _node_lost(self, cluster: Cluster, node: Node, reason: str) -> None:
        """ClusterService.on_node_lost: the monitor declared ``node`` lost; a running session on it
        ends, heals or hands raft over (its watcher acts on ``live.lost``)."""
        live = self.live.get(self.by_cluster.get(cluster.id, ""))
        if live is None or live.status != SessionState.RUNNING or not any(v.node.id == node.id for v in live.nodes):
            return
        self._lose(live, node, f"node {node.id} ({node.role}, rank {node.rank}) lost: {reason}")

    def _give_up(self, live: LiveSession, exc: Exception) -> None:
        """The session cannot be followed any more: mark it failed (in memory at least)."""
        live.error = live.error or (f"the server could not follow the session for {WATCH_GIVE_UP_S:.0f} s "
                                    f"({type(exc).__name__}; see server.log)")
        try:
            self._finish(live, self.clusters.get_cluster(live.cluster_id, active=False), SessionState.FAILED)
        except Exception:
            log.exception("recording the end of session %s failed", live.session_id)
            live.status = transition(live.status, SessionState.FAILED, live.session_id)
            live.ended = live.ended or time.time()
            live.done.set()

    def _heal(self, live: LiveSession, cluster: Cluster) -> bool:
        """auto_healing: replace the lost node (same role and shard), re-form, resume from the last checkpoint."""
        svc, dead = self.clusters, live.lost
        assert dead is not None and live.job is not None
        svc.event(live.cluster_id, "healing", f"replacing {dead.id} after: {live.error}", session_id=live.session_id)
        survivors = [v.node for v in live.nodes if v.node.id != dead.id]
        try:
            self._stop_and_wait(cluster, survivors, timeout=90)
            svc.replace_node(live.cluster_id, dead)
            svc.reform(live.cluster_id)
            with self.store.session() as s:
                last = s.scalars(select(Checkpoint).where(Checkpoint.session_id == live.session_id)
                                 .order_by(Checkpoint.created_at.desc())).first()
            resume = last.path if last is not None and Path(last.path).exists() else None
            self._restart(live, cluster, resume)
        except Exception as exc:
            log.exception("healing session %s failed", live.session_id)
            live.error = f"{live.error}; auto-healing failed: {exc}"
            return False
        svc.event(live.cluster_id, "session_healed",
                  f"restart {live.restarts}: {dead.id} replaced, resumed from "
                  + (resume or "the start (no checkpoint)"),
                  session_id=live.session_id, data={"restarts": live.restarts, "resume_from": resume})
        return True

    def _secagg_dropout(self, live: LiveSession, cluster: Cluster) -> bool:
        """secure_aggregation: a worker lost mid-round is recovered by the survivors
        (workers.training.secure_round). They finish the round without it and end their job, the
        aggregator having written the round's candidate into a checkpoint; the group re-forms over
        them (with auto_healing a replacement joins) and the session resumes from that checkpoint,
        committing the round first. False when the session is not such a case or the survivors
        could not recover the round (then healing or failing take over)."""
        svc, dead, job = self.clusters, live.lost, live.job
        assert dead is not None and job is not None
        if not (job.secure_aggregation and job.mode == "federated" and dead.role == "worker"):
            return False
        survivors = [v.node for v in live.nodes if v.node.id != dead.id]
        svc.event(live.cluster_id, "secagg_dropout",
                  f"worker {dead.id} (rank {dead.rank}) dropped out of a secure-aggregation round; the survivors "
                  "finish the round without it", session_id=live.session_id, node_id=dead.id)
        try:
            snaps = self._wait_out(cluster, survivors, SECAGG_ROUND_WAIT_S)
            done = next((x for x in snaps if x.node_stats.get("secagg_recovered_round")), None)
            rnd = int(done.node_stats["secagg_recovered_round"]) if done else 0
            resume = next((c for c in (done.checkpoints if done else []) if p.checkpoint_epoch(c) == rnd - 1
                           and Path(c).is_file()), None)
            if resume is None:
                why = next((x.error for x in snaps if x.error), None) or "no survivor reported the recovered round"
                live.error = f"{live.error}; the survivors could not recover the secure-aggregation round: {why}"
                return False
            replacement = svc.replace_node(live.cluster_id, dead) if cluster.auto_healing else None
            svc.reform(live.cluster_id)
            nodes, _ = self._restart(live, cluster, resume)
        except Exception as exc:
            log.exception("continuing session %s without %s failed", live.session_id, dead.id)
            live.error = f"{live.error}; continuing with the survivors failed: {exc}"
            return False
        svc.event(live.cluster_id, "secagg_dropout_recovered",
                  f"round {rnd}: worker {dead.id} (rank {dead.rank}) dropped out mid-round; the survivors finished "
                  "the round without it (SecAgg dropout recovery) and the round's aggregate is "
                  f"the sum of the surviving workers' updates; the group re-formed over {len(nodes)} nodes"
                  + (f" with {replacement.id} in its place" if replacement else "")
                  + f" and the session resumed from {resume}, committing round {rnd} first",
                  session_id=live.session_id, node_id=dead.id,
                  data={"dropped_node": dead.id, "dropped_rank": dead.rank, "round": rnd, "resume_from": resume,
                        "replacement": replacement.id if replacement else None, "restarts": live.restarts})
        return True

    def _membership_changed(self, cluster_id: str, what: str) -> bool:
        """ClusterService.on_training_membership: nodes joined while a session runs here."""
        live = self.live.get(self.by_cluster.get(cluster_id, ""))
        if live is None or live.status != SessionState.RUNNING or live.job is None or live.stop_requested:
            return False
        with live.lock:
            live.rescale = what if live.rescale is None else f"{live.rescale}; {what}"
        return True

    def _leave_at_boundary(self, cluster_id: str, node: Node) -> bool:
        """ClusterService.on_training_leave: ``node`` was removed while a session runs here; it leaves
        at the next boundary. Refused when the rest could not run the session."""
        live = self.live.get(self.by_cluster.get(cluster_id, ""))
        if live is None or live.status != SessionState.RUNNING or live.job is None or live.stop_requested:
            return False
        with live.lock:
            rest = [n for n in self.store.nodes(cluster_id) if n.id != node.id and n.id not in live.leaving]
            if not any(n.role == "worker" and "training" in n.capabilities for n in rest):
                raise Conflict(f"node {node.id} is the last worker with the 'training' capability of session "
                               f"{live.session_id}; stop the session before removing it",
                               next_step=NextStep.STOP_TRAINING)
            if live.job.mode == "parameter_server" and not any(n.role == "parameter_server" for n in rest):
                raise Conflict(f"node {node.id} is the last parameter server of parameter-server session "
                               f"{live.session_id}; deploy another parameter server first, or stop the session",
                               next_step=NextStep.STOP_TRAINING)
            live.leaving[node.id] = node
            what = f"node {node.id} ({node.role}) removed"
            live.rescale = what if live.rescale is None else f"{live.rescale}; {what}"
        return True

    def _retire_leavers(self, live: LiveSession, leaving: dict[str, Node]) -> None:
        """Stop the nodes removed while the session ran (they have left its job)."""
        for node_id in leaving:
            self.clusters.retire_node(live.cluster_id, node_id)

    def _rescale(self, live: LiveSession, cluster: Cluster) -> bool:
        """Elastic scale-out and scale-in: the members stop at their next stop check (each writes its
        final checkpoint there), nodes removed meanwhile are stopped, the group re-forms over every live
        node (the data is re-sharded and parameter servers re-split the parameters by the new roles)
        and the session resumes from that checkpoint under the same id. True once the session has ended."""
        svc = self.clusters
        assert live.job is not None
        with live.lock:
            what, live.rescale = live.rescale, None
            leaving, live.leaving = live.leaving, {}
        members = [v.node for v in live.nodes]
        try:
            snaps = self._stop_and_wait(cluster, members, timeout=boundary_wait_s(live))
            total = live.job.rounds if live.job.mode == "federated" else live.job.epochs
            reached = max(x.epoch for x in snaps)
            written = [Path(c) for x in snaps for c in x.checkpoints if Path(c).is_file()]
            if reached >= total:  # the boundary was the last one: nothing left to rescale
                live.leaving.update(leaving)  # _finish stops them
                self._finish(live, cluster, SessionState.COMPLETED)
                return True
            resume = str(max(written, key=lambda f: f.stat().st_mtime)) if written else None
            self._retire_leavers(live, leaving)
            svc.reform(live.cluster_id)
            nodes, _ = self._restart(live, cluster, resume)
        except Exception as exc:
            log.exception("re-forming session %s with new nodes failed", live.session_id)
            live.error = f"re-forming the session after a membership change ({what}) failed: {exc}"
            return False
        joined = [n.id for n in nodes if n.id not in {m.id for m in members}]
        left = [n.id for n in members if n.id in leaving]
        changes = ([f"{', '.join(joined)} joined"] if joined else []) + ([f"{', '.join(left)} left"] if left else [])
        svc.event(live.cluster_id, "session_rescaled",
                  f"{what}: {'; '.join(changes) or 'no node joined or left'}; the session re-formed over "
                  f"{len(nodes)} nodes and resumed after {'round' if live.job.mode == 'federated' else 'epoch'} "
                  f"{reached} from " + (resume or "the start (no checkpoint)"),
                  session_id=live.session_id,
                  data={"joined": joined, "left": left, "resume_from": resume, "after": reached})
        return False

    def _raft_takeover(self, live: LiveSession, cluster: Cluster) -> bool:
        """raft: the survivors go on without the lost node; the first surviving aggregator (else the
        first worker) leads a new term from the last version a majority committed."""
        svc, dead = self.clusters, live.lost
        assert dead is not None and live.job is not None
        survivors = [v.node for v in live.nodes if v.node.id != dead.id]
        if not any(n.role == "worker" for n in survivors):
            return False
        try:
            self._stop_and_wait(cluster, survivors, timeout=90)
            svc.reform(live.cluster_id)
            committed = [f for f in (Path(n.sandbox) / "raft" / "committed.safetensors" for n in survivors)
                         if f.exists()]
            resume = str(max(committed, key=lambda f: f.stat().st_mtime)) if committed else None
            nodes, job = self._restart(live, cluster, resume, raft_term=live.job.raft_term + 1)
        except Exception as exc:
            log.exception("raft takeover in session %s failed", live.session_id)
            live.error = f"{live.error}; raft takeover failed: {exc}"
            return False
        leader = next((n for n in nodes if n.role == "aggregator"), next(n for n in nodes if n.role == "worker"))
        svc.event(live.cluster_id, "raft_leader_changed",
                  f"term {job.raft_term}: {leader.id} ({leader.role}) leads after {dead.id} was lost; resumed from "
                  + (resume or "the start (nothing committed yet)"), session_id=live.session_id,
                  data={"term": job.raft_term, "leader": leader.id, "resume_from": resume})
        return True

    def _restart(self, live: LiveSession, cluster: Cluster, resume: str | None,
                 **changes: Any) -> tuple[list[Node], p.TrainJob]:
        """Start the session again on the cluster's live nodes (already re-formed), from ``resume``."""
        svc = self.clusters
        assert live.job is not None
        nodes = sorted(svc.store.nodes(live.cluster_id), key=lambda n: n.rank if n.rank is not None else 1 << 30)
        job = live.job.model_copy(update={
            "resume_from": resume, "roles": [n.role for n in nodes],
            "behaviors": [p.Behavior(**(n.options.get("behavior") or {})) for n in nodes],
            "capabilities": [list(n.capabilities) for n in nodes], **changes})
        started = parallel(lambda n: svc.client(cluster, n).start_training(job), nodes)
        bad = [f"{n.id}: {e}" for n, e in zip(nodes, started) if isinstance(e, BaseException)]
        if bad:
            raise ServiceError("restarting the session failed on " + "; ".join(bad))
        with self.store.session() as s:
            move(s.get(Cluster, live.cluster_id), ClusterState.TRAINING)
        with live.lock:
            live.job, live.restarts = job, live.restarts + 1
            live.nodes = [NodeView(n, job=t.job) for n, t in zip(nodes, started)]  # type: ignore[union-attr]
            live.error, live.lost, live.last_event_epoch = None, None, 0
            live.lost_seen.clear()
        for node in nodes:  # lost while restarting: the monitor's verdict came before these views
            current = self.store.node(node.id)
            if current is None or current.status not in LIVE_NODE_STATES:
                self._lose(live, node, f"node {node.id} ({node.role}, rank {node.rank}) lost: "
                                       f"{current.error if current else 'removed'}")
        return nodes, job

    def _stop_and_wait(self, cluster: Cluster, nodes: list[Node], timeout: float) -> list[p.TrainProgress]:
        """Ask nodes to stop and wait until none is still inside the job (they may sit in a collective);
        their last progress."""
        parallel(lambda n: self.clusters.client(cluster, n).stop_training(), nodes)
        return self._wait_out(cluster, nodes, timeout)

    def _wait_out(self, cluster: Cluster, nodes: list[Node], timeout: float) -> list[p.TrainProgress]:
        """Wait until none of ``nodes`` is still inside the job; their last progress."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            snaps = parallel(lambda n: self.clusters.client(cluster, n).training_status(1 << 62), nodes)
            if all(isinstance(x, p.TrainProgress) and x.state not in p.BUSY_JOB_STATES for x in snaps):
                return snaps  # type: ignore[return-value]
            time.sleep(0.5)
        raise ServiceError(f"the surviving nodes did not leave the session within {timeout:.0f} s")

    def on_progress(self, cluster_id: str, node_id: str, snap: p.TrainProgress, cursor: int) -> int | None:
        """A node's pushed progress (service.telemetry, on its listener's thread): applied to the
        running session it belongs to. Returns the sample cursor to acknowledge; None when no
        session here follows that job."""
        live = self.live.get(self.by_cluster.get(cluster_id, ""))
        if live is None or live.status != SessionState.RUNNING or snap.session_id != live.session_id:
            return None
        with live.lock:
            view = next((v for v in live.nodes if v.node.id == node_id), None)
            if view is None or (view.job is not None and snap.job != view.job):
                return None  # a node the session no longer runs on, or an earlier start of it
            view.job = snap.job
            if cursor != view.cursor:
                # The node pushed from another cursor (a new controller, a restarted session):
                # take the rest, but not its samples; it sends them again from ours.
                snap = snap.model_copy(update={"samples": []})
            self._apply_progress(live, view, snap)
            return view.cursor

    def _apply_progress(self, live: LiveSession, view: NodeView, snap: p.TrainProgress) -> None:
        """Store what a progress snapshot brings: samples (reporter), epoch events, local loss, checkpoints."""
        node = view.node
        if snap.reporter and snap.samples:
            with self.store.session() as s:
                s.add_all(MetricSample(session_id=live.session_id, node_id=node.id, seq=m.seq, time=m.time,
                                       epoch=m.epoch, step=m.step, name=m.name, value=m.value) for m in snap.samples)
            view.cursor = snap.samples[-1].seq
            self.tensorboard.scalars(live.session_id, ((m.name, m.epoch, m.value) for m in snap.samples))
            # One event per finished epoch/round, from the samples (a push may hold several epochs).
            by_epoch: dict[int, dict[str, float]] = {}
            for m in snap.samples:
                by_epoch.setdefault(m.epoch, {})[m.name] = m.value
                live.epoch_metrics.setdefault(m.epoch, {})[m.name] = m.value
            unit = "round" if live.mode == "federated" else "epoch"
            for epoch in sorted(e for e in by_epoch if e > live.last_event_epoch and e > 0):
                values = by_epoch[epoch]
                if not any(k in values for k in ("val_loss", "loss", "val_accuracy", "val_perplexity")):
                    continue
                shown = {k: round(v, 4) for k, v in values.items() if k in ("loss", "val_loss", "val_accuracy",
                                                                             "val_perplexity", "dp_epsilon")}
                self.clusters.event(live.cluster_id, "epoch_completed",
                                    f"{unit} {epoch}/{snap.total_epochs}: {shown}",
                                    session_id=live.session_id, data={"epoch": epoch, **values})
                live.last_event_epoch = epoch
        # Per-node local loss as a series too (one point per epoch/round the node finished).
        if "local_loss" in snap.node_stats and snap.epoch > (view.snapshot.epoch if view.snapshot else 0):
            with self.store.session() as s:
                s.add(MetricSample(session_id=live.session_id, node_id=node.id, seq=0, time=time.time(),
                                   epoch=snap.epoch, step=snap.step, name="local_loss",
                                   value=snap.node_stats["local_loss"]))
            self.tensorboard.worker_scalar(live.session_id, node.id, "local_loss", snap.epoch,
                                           snap.node_stats["local_loss"])
        before = view.snapshot
        known = set(before.checkpoints) | set(before.rotated_checkpoints) if before else set()
        rotated = set(snap.rotated_checkpoints)
        # Rotated ones too: with pushes every second, a file may be written and rotated away between two.
        new = [path for path in [*snap.rotated_checkpoints, *snap.checkpoints] if path not in known]
        # The file's own epoch: one push may bring several checkpoints (e056, e058, e060).
        for path in sorted(new, key=lambda x: p.checkpoint_epoch(x) or snap.epoch):
            self._record_checkpoint(live, node, path, p.checkpoint_epoch(path) or snap.epoch, deleted=path in rotated)
        # Samples were consumed: keep the snapshot without them (the cursor moved on).
        view.snapshot = snap.model_copy(update={"samples": []})

    @staticmethod
    def _lose(live: LiveSession, node: Node, message: str) -> None:
        """The session lost ``node`` (the first loss names the error)."""
        if live.error is None:
            live.error, live.lost = message, node
        live.lost_seen.set()

    @staticmethod
    def _fail(live: LiveSession, message: str) -> None:
        """The session fails with ``message`` unless a loss already explains it."""
        if live.error is None:
            live.error = message

    def _record_checkpoint(self, live: LiveSession, node: Node, path: str, epoch: int, deleted: bool = False) -> None:
        with self.store.session() as s:
            s.add(Checkpoint(id="ckpt_" + secrets.token_hex(6), session_id=live.session_id, cluster_id=live.cluster_id,
                             node_id=node.id, path=path, epoch=epoch, created_at=time.time(), deleted=deleted))
            # Files the node pruned (max_checkpoints) are marked, not forgotten.
            for old in s.scalars(select(Checkpoint).where(Checkpoint.session_id == live.session_id,
                                                          Checkpoint.deleted.is_(False))):
                if old.path != path and not Path(old.path).exists():
                    old.deleted = True
        self.clusters.event(live.cluster_id, "checkpoint_saved", f"checkpoint {path}", session_id=live.session_id,
                            node_id=node.id, data={"path": path, "epoch": epoch})

    def _finish(self, live: LiveSession, cluster: Cluster, status: SessionState) -> None:
        failed = status == SessionState.FAILED
        if failed:
            # Survivors may sit in a collective waiting for the dead peer: tell them to stop.
            parallel(lambda v: self.clusters.client(cluster, v.node).stop_training(),
                     [v for v in live.nodes if v.node.status in LIVE_NODE_STATES])
        if failed and live.lost is not None:
            # Leave the survivors ready for a new session (re-formed without the lost node) before
            # the session reads as failed, so a caller that reacts at once finds them connected.
            survivors = [v.node for v in live.nodes if v.node.id != live.lost.id]
            try:
                self._stop_and_wait(cluster, survivors, timeout=40)
                self.clusters.reform(live.cluster_id)
            except Exception as exc:
                log.warning("re-forming cluster %s after the failure did not work: %s", live.cluster_id, exc)
        live.status = transition(live.status, status, live.session_id)
        live.ended = time.time()
        view = live.view()
        final = {**view.metrics, "elapsed_s": view.elapsed_s, "epochs_done": view.epoch, "nodes": view.nodes}
        if reason := _end_reason(live, view.metrics):
            final["end_reason"] = reason
        with self.store.session() as s:
            row = s.get(TrainingSession, live.session_id)
            move(row, status)
            row.finished_at, row.error, row.final_metrics = live.ended, live.error, final
            c = s.get(Cluster, live.cluster_id)
            if c.status == ClusterState.TRAINING:
                move(c, ClusterState.NEEDS_CONNECT if failed else ClusterState.CONNECTED)
                if failed:
                    c.needs_connect_reason = f"session {live.session_id} failed"
        self.clusters.event(live.cluster_id, f"session_{status}",
                            f"session {live.session_id} {status}" + (f": {live.error}" if live.error else "")
                            + (f" ({final['end_reason']})" if "end_reason" in final else ""),
                            session_id=live.session_id)
        self.tensorboard.finish(live.session_id, status)
        for node_id in list(live.leaving):  # removed during the session: stopped now, the group re-formed
            try:
                self.clusters.remove_node(node_id)
            except ServiceError as exc:
                log.warning("removing %s after session %s: %s", node_id, live.session_id, exc)
        live.leaving.clear()
        live.done.set()

    # ----------------------------------------------------------------- status
    def session(self, session_id: str) -> TrainingSession:
        with self.store.session() as s:
            row = s.get(TrainingSession, session_id)
        if row is None:
            raise NotFound(f"training session {session_id!r} does not exist", next_step=NextStep.FIND_SESSION)
        return row

    def status(self, session_id: str) -> r.TrainingStatusReply:
        row = self.session(session_id)
        live = self.live.get(session_id)
        with self.store.session() as s:
            samples = list(s.scalars(select(MetricSample).where(MetricSample.session_id == session_id)
                                     .order_by(MetricSample.id)))
            ckpts = list(s.scalars(select(Checkpoint).where(Checkpoint.session_id == session_id)
                                   .order_by(Checkpoint.created_at)))
        history: dict[str, list[list[float]]] = {}
        for m in samples:
            key = f"local_loss/{m.node_id}" if m.name == "local_loss" else m.name
            history.setdefault(key, []).append([m.epoch, m.step, m.value])
        return r.TrainingStatusReply(
            success=True, session_id=session_id, cluster_id=row.cluster_id, status=row.status, config=row.config,
            created_at=row.created_at, finished_at=row.finished_at, live=live.view() if live else None,
            final_metrics=row.final_metrics, history=history,
            checkpoints=[r.CheckpointInfo(checkpoint_id=c.id, path=c.path, epoch=c.epoch, node_id=c.node_id,
                                          created_at=c.created_at, deleted=c.deleted or not Path(c.path).exists())
                         for c in ckpts],
            error=row.error,
        )

    def live_view(self, cluster_id: str) -> r.TrainingLive | None:
        sid = self.by_cluster.get(cluster_id)
        live = self.live.get(sid) if sid else None
        return live.view() if live else None

    def wait(self, session_id: str, timeout: float) -> bool:
        live = self.live.get(session_id)
        return live.done.wait(timeout) if live else True

    def follow(self, session_id: str, cluster_id: str, timeout_s: float) -> Iterator[r.TrainingLive]:
        """Wait until a session ends, at most ``timeout_s``, yielding the cluster's live view about once
        a second (progress for the caller). Each step blocks up to a second: callers run each ``next``
        on a worker thread and may stop between steps."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = self.wait(session_id, 1.0)
            view = self.live_view(cluster_id)
            if view is not None:
                yield view
            if done:
                return

    # ------------------------------------------------------------------- stop
    def stop(self, session_id: str, timeout: float = 60.0) -> r.TrainingStopReply:
        row = self.session(session_id)
        live = self.live.get(session_id)
        if live is None or row.status in ENDED_SESSION_STATES:
            raise Conflict(f"session {session_id} is not running (status {row.status})")
        cluster = self.clusters.get_cluster(row.cluster_id, active=False)
        live.stop_requested = True
        results = parallel(lambda v: self.clusters.client(cluster, v.node).stop_training(), live.nodes)
        errors = [f"{v.node.id}: {e}" for v, e in zip(live.nodes, results) if isinstance(e, BaseException)]
        if errors:
            log.warning("stop request failed on %s", "; ".join(errors))
        if not live.done.wait(timeout):
            raise ServiceError(f"session {session_id} did not stop within {timeout:.0f} s",
                               next_step=NextStep.TERMINATE_NODES)
        return r.TrainingStopReply(success=True, session_id=session_id, status=live.status,
                                   message=f"session ended {live.status} at epoch {live.view().epoch}")

    def last_results(self, cluster_id: str) -> tuple[dict[str, Any] | None, list[str]]:
        """Final metrics of the cluster's latest session and the checkpoint files still on disk."""
        with self.store.session() as s:
            row = s.scalars(select(TrainingSession).where(TrainingSession.cluster_id == cluster_id)
                            .order_by(TrainingSession.created_at.desc())).first()
            paths = list(s.scalars(select(Checkpoint.path).where(Checkpoint.cluster_id == cluster_id)))
        return (row.final_metrics if row else None), [x for x in paths if Path(x).exists()]

    def close(self) -> None:
        self._closed.set()
        self.tensorboard.close()

    # ------------------------------------------- cluster views that include training
    def cluster_status(self, cluster_id: str) -> r.ClusterStatusReply:
        reply = self.clusters.status(cluster_id)
        session = self.live.get(self.by_cluster.get(cluster_id, ""))
        live = session.view() if session else None
        if live is None:
            return reply
        for node in reply.nodes:
            node.metrics.update(live.nodes.get(node.node_id, {}))
            if node.node_id in live.reputation:
                node.metrics["reputation"] = live.reputation[node.node_id]
        # Each node's stats are in its row; carried once, the reply is smaller to send and to validate.
        return reply.model_copy(update={
            "training": live.model_copy(update={"nodes": None}), "training_progress": live.progress_pct,
            "current_epoch": live.epoch,
            "current_loss": live.metrics.get("loss"),
            "global_accuracy": live.metrics.get("val_accuracy", live.metrics.get("accuracy")),
            **guide_fields(live, {n.node_id: n.role for n in reply.nodes}, session.epoch_metrics),
        })

    def terminate_cluster(self, cluster_id: str,
                          export: Callable[[], r.ExportReply | None] | None = None) -> r.TerminateReply:
        """Stop a running session first (so it ends 'stopped', not 'failed'), export the final model
        with ``export`` while the nodes still hold it, then stop every node."""
        sid = self.by_cluster.get(cluster_id)
        live = self.live.get(sid) if sid else None
        if live is not None and live.status == SessionState.RUNNING:
            try:
                self.stop(live.session_id, timeout=30)
            except ServiceError as exc:
                log.warning("stopping %s before terminate: %s", live.session_id, exc)
        # Only a session that ended well left a model worth exporting (and nodes that answer).
        trained = live is not None and live.status in (SessionState.COMPLETED, SessionState.STOPPED)
        final_export = export() if export and trained else None
        logs = [str(Path(n.sandbox) / NODE_LOG) for n in self.store.nodes(cluster_id) if n.sandbox]
        reply = self.clusters.terminate(cluster_id)
        final, paths = self.last_results(cluster_id)
        if final is not None and live is not None:
            final = {**final, **session_totals(live)}
        artifacts = r.Artifacts(final_model=final_export.directory if final_export else None,
                                final_model_files=final_export.files if final_export else [],
                                checkpoints=paths, logs=[x for x in logs if Path(x).exists()])
        return reply.model_copy(update={"final_metrics": final, "checkpoints": paths, "checkpoints_saved": len(paths),
                                        "artifacts": artifacts})

    # ---------------------------------------------------------------- recover
    def recover(self) -> None:
        """After a server restart: watch sessions still running on the nodes again; mark the rest
        interrupted, naming their last checkpoint. A session is never silently forgotten."""
        with self.store.session() as s:
            rows = list(s.scalars(select(TrainingSession).where(TrainingSession.status == SessionState.RUNNING)))
        for row in rows:
            cluster = self.clusters.get_cluster(row.cluster_id, active=False)
            nodes = sorted(self.store.nodes(row.cluster_id), key=lambda n: n.rank if n.rank is not None else 1 << 30)
            clients = [self.clusters.client(cluster, n) for n in nodes]
            snaps = parallel(lambda c: c.training_status(1 << 62), clients)
            same = nodes and all(isinstance(x, p.TrainProgress) and x.session_id == row.id for x in snaps)
            if same and cluster.status != ClusterState.TERMINATED:
                with self.store.session() as s:
                    cursors = dict(s.execute(select(MetricSample.node_id, func.max(MetricSample.seq))
                                             .where(MetricSample.session_id == row.id)
                                             .group_by(MetricSample.node_id)).all())
                    recorded = set(s.scalars(select(Checkpoint.path).where(Checkpoint.session_id == row.id)))
                    move(s.get(Cluster, row.cluster_id), ClusterState.TRAINING)
                # Progress shows at once; checkpoints saved while no controller watched are still news.
                views = [NodeView(n, cursor=cursors.get(n.id) or 0, job=x.job, snapshot=x.model_copy(update={
                    "samples": [], "checkpoints": [c for c in x.checkpoints if c in recorded],
                    "rotated_checkpoints": [c for c in x.rotated_checkpoints if c in recorded]}))
                    for n, x in zip(nodes, snaps)]  # type: ignore[union-attr]
                live = LiveSession(row.id, row.cluster_id, row.config.get("mode", "?"), row.created_at, views)
                self.live[row.id] = live
                self.by_cluster[row.cluster_id] = row.id
                self.clusters.event(row.cluster_id, "session_reattached", f"session {row.id} is watched again",
                                    session_id=row.id)
                threading.Thread(target=self._watch, args=(live,), name=f"watch-{row.id}", daemon=True).start()
                continue
            with self.store.session() as s:
                last = s.scalars(select(Checkpoint).where(Checkpoint.session_id == row.id)
                                 .order_by(Checkpoint.created_at.desc())).first()
                session = s.get(TrainingSession, row.id)
                move(session, SessionState.INTERRUPTED)
                session.finished_at = time.time()
                session.error = ("the server restarted and the session no longer runs on the nodes; " +
                                 (f"last checkpoint {last.id} ({last.path}): resume with resume_from='{last.id}'"
                                  if last else "no checkpoint was saved"))
                c = s.get(Cluster, row.cluster_id)
                if c.status == ClusterState.TRAINING:
                    move(c, ClusterState.NEEDS_CONNECT)
                    c.needs_connect_reason = f"session {row.id} was interrupted"
            self.clusters.event(row.cluster_id, "session_interrupted",
                                f"session {row.id} interrupted by a server restart", session_id=row.id)


def _end_reason(live: LiveSession, metrics: dict[str, float]) -> str | None:
    """Why a session ended before its last epoch/round, when a rule (not a failure) decided it."""
    if metrics.get("dp_budget_stop") and live.job is not None and live.job.differential_privacy is not None:
        return (f"stopped at the privacy budget: epsilon {metrics.get('dp_epsilon', 0.0):.3g} spent of "
                f"target_epsilon {live.job.differential_privacy.target_epsilon:g} (delta "
                f"{metrics.get('dp_delta', 0.0):.3g}); another round would exceed it")
    return None
