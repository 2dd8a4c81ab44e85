"""The registry's operations: register, list/get, evaluate, promote (gates), rollback, serve, fuse."""

from __future__ import annotations

import json
import logging
import platform
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flow_nexus_server import __version__
from flow_nexus_server.registry import gates as g
from flow_nexus_server.registry import manifest as mf
from flow_nexus_server.registry import sources
from flow_nexus_server.registry.distill import STUDENT_EPOCHS, teacher_labels, train_student
from flow_nexus_server.registry.evaluation import evaluate, load_eval_set
from flow_nexus_server.registry.releases import Releases
from flow_nexus_server.registry.slo import Slo, SloWindows, breach
from flow_nexus_server.registry.versions import ALIASES, NAME, SEMVER, newest, next_version
from flow_nexus_server.service.budget import node_memory_mb
from flow_nexus_server.service.errors import NotFound, ServiceError
from flow_nexus_server.service.inference import InferenceService, set_serving_release
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.service.training import TrainingService
from flow_nexus_server.store import ModelRelease
from workers import protocol as p

log = logging.getLogger(__name__)
PREFIX = "registry:"


def dataset_key(dataset: str) -> str:
    """How evaluations are filed: a name or path as given, inline examples by their digest."""
    return dataset if len(dataset) <= 200 else "inline:" + mf.sha256_json(dataset)[:16]


def release_view(row: ModelRelease, aliases: dict[str, str], *, with_manifest: bool) -> dict[str, Any]:
    """What list / get answer about one release."""
    view = {"name": row.name, "version": row.version, "kind": row.manifest.get("kind", "model"),
            "aliases": sorted(a for a, v in aliases.items() if v == row.version), "directory": row.directory,
            "created_at": row.created_at, "promoted_at": row.promoted_at, "rolled_back_at": row.rolled_back_at,
            "gates": row.gates, "evaluations": row.evaluations or {}, "parents": row.manifest.get("parents")}
    if with_manifest:
        view["manifest"] = row.manifest
    return view


class RegistryService:
    def __init__(self, inference: InferenceService, training: TrainingService) -> None:
        self.inference = inference
        self.training = training
        self.clusters = inference.clusters
        self.releases = Releases(self.clusters.store)
        self._lock = threading.Lock()  # one version number per register / fuse at a time
        self._rollback_lock = threading.Lock()  # one automatic rollback per breach
        self.windows = SloWindows()
        self.inference.observers.append(self.observe)

    @property
    def root(self) -> Path:
        return self.clusters.settings.home / "registry"

    # ------------------------------------------------------------ look-ups
    def release(self, name: str, ref: str) -> ModelRelease:
        """A release by version or alias (``stable``, ``previous``)."""
        if not NAME.match(name):
            raise ServiceError(f"model name {name!r} is not valid: letters, digits, '.', '_' and '-', at most 64")
        version = self.releases.aliases(name).get(ref, ref) if ref in ALIASES else ref
        if ref in ALIASES and version == ref:
            raise NotFound(f"model {name} has no {ref} release yet; promote one with neural_model_promote")
        if not SEMVER.match(version):
            raise ServiceError(f"version {ref!r} is neither a semantic version (1.2.0) nor an alias (stable, previous)")
        row = self.releases.get(name, version)
        if row is None:
            known = ", ".join(self.releases.versions(name)) or "none"
            raise NotFound(f"model {name} has no version {version} (versions: {known}); neural_model_list lists them")
        return row

    def list(self, name: str | None) -> list[dict[str, Any]]:
        rows = self.releases.of(name)
        if name is not None and not rows:
            raise NotFound(f"no model named {name!r} is registered; register one with neural_model_register")
        aliases = {n: self.releases.aliases(n) for n in {r.name for r in rows}}
        return [release_view(r, aliases[r.name], with_manifest=False) for r in rows]

    def get(self, name: str, version: str) -> dict[str, Any]:
        row = self.release(name, version)
        return release_view(row, self.releases.aliases(name), with_manifest=True)

    # ------------------------------------------------------------ register
    def register(self, source: str, name: str, notes: str | None, checkpoint: str = "final") -> dict[str, Any]:
        if not NAME.match(name):
            raise ServiceError(f"model name {name!r} is not valid: letters, digits, '.', '_' and '-', at most 64")
        folder = self.root / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = folder / f".staging-{secrets.token_hex(4)}"
        try:
            provenance = sources.fill(self.inference, source, checkpoint, staging)
            with self._lock:
                return self._publish(name, staging, provenance, notes)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, name: str, staging: Path, provenance: dict[str, Any], notes: str | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
        copied = provenance.pop("copied_manifest", None)
        existing = self.releases.versions(name)
        if copied and copied.get("name") == name and copied.get("version") not in existing \
                and SEMVER.match(str(copied.get("version"))):
            manifest = copied  # a release folder from another machine: registered unchanged
        else:
            try:
                config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
                config["task"]["input_shape"]  # noqa: B018 - the contract needs it
            except (ValueError, KeyError, TypeError) as exc:
                raise ServiceError(f"config.json of {provenance.get('source')} is not one this server writes; "
                                   "export the model again (format safetensors)") from exc
            tok = staging / "tokenizer.json"
            contract = mf.contract(config, mf.sha256_file(tok) if tok.is_file() else None)
            latest = newest(existing)
            before = self.releases.get(name, latest).manifest.get("contract") if latest else None
            version = next_version(existing, breaking=before is not None and before != contract)
            if copied:
                provenance["imported_from"] = {"name": copied.get("name"), "version": copied.get("version"),
                                               "manifest_sha256": mf.sha256_json(copied)}
            manifest = self._manifest(name, version, staging, config, contract, provenance, notes, **(extra or {}))
        reply = self._place(name, staging, manifest)
        self.clusters.store.add_event(provenance.get("cluster") or "-", "model_registered",
                                      f"{name}@{reply['version']} registered from {provenance.get('source')}")
        return reply

    @staticmethod
    def _manifest(name: str, version: str, staging: Path, config: dict[str, Any], contract: dict[str, Any],
                  provenance: dict[str, Any], notes: str | None, **extra: Any) -> dict[str, Any]:
        training = dict(config.get("training") or {})
        dataset = training.get("dataset")
        card = staging / "README.md"
        import torch

        return {
            "name": name, "version": version, "kind": "model", "created_at": time.time(), "notes": notes,
            "files": mf.artifact_files(staging), "contract": contract,
            "model_card": card.read_text(encoding="utf-8") if card.is_file() else None,
            "training_config": {**training, "architecture": config.get("architecture"),
                                "preset": config.get("preset"), "layers": config.get("layers"),
                                "parameters": config.get("parameters")},
            "dataset_fingerprint": {
                "spec": dataset if not isinstance(dataset, str) or len(dataset) <= 200 else dataset[:200] + "...",
                "sha256": mf.sha256_json({k: training.get(k) for k in ("dataset", "validation_split", "seed")})},
            "metrics": dict(config.get("metrics") or {}),
            "provenance": {**provenance, "package": "flow-nexus-server", "package_version": __version__,
                           "torch": torch.__version__, "python": platform.python_version()},
            **extra,
        }

    # ------------------------------------------------------------ serving
    def verified_folders(self, row: ModelRelease) -> list[Path]:
        """The folders to load (the release's, or an ensemble's parents'), each checked against its manifest."""
        self._verify(row)
        if row.manifest.get("kind") != "ensemble":
            return [Path(row.directory)]
        parents = []
        for entry in row.manifest["parents"]:
            parent = self.release(entry["name"], entry["version"])
            if mf.sha256_json(parent.manifest) != entry["manifest_sha256"]:
                raise ServiceError(f"parent {parent.name}@{parent.version} of {row.name}@{row.version} is not the "
                                   "release the ensemble was fused from (its manifest differs)")
            self._verify(parent)
            parents.append(Path(parent.directory))
        return parents

    @staticmethod
    def _verify(row: ModelRelease) -> None:
        folder = Path(row.directory)
        try:
            if mf.sha256_json(mf.read(folder)) != mf.sha256_json(row.manifest):
                raise mf.ManifestError(f"{folder / mf.MANIFEST} differs from the manifest registered")
            mf.verify(folder, row.manifest)
        except mf.ManifestError as exc:
            raise ServiceError(f"release {row.name}@{row.version} failed verification and is not loaded: "
                               f"{exc}") from exc

    def serve(self, cluster_id: str, path: str) -> dict[str, Any]:
        """Load ``registry:NAME@ref`` on every inference node of the cluster, after verifying sha256s.
        An ensemble's parents are spread across the nodes (node i holds parent i mod k)."""
        ref = path[len(PREFIX):]
        name, _, version = ref.partition("@")
        row = self.release(name, version or "stable")
        folders = self.verified_folders(row)
        try:
            info = self._load(cluster_id, folders)
        except ServiceError as exc:
            raise ServiceError(f"{name}@{row.version}: {exc}") from exc
        label = f"{name}@{row.version}"
        self.windows.reset(cluster_id)  # the SLO judges this release's own predictions
        set_serving_release(self.clusters.store, cluster_id, {"name": name, "version": row.version,
                                                             "ref": version or "stable"})
        self.clusters.event(cluster_id, "model_loaded", f"release {label} loaded on {info['nodes']} node(s)")
        return {"source": label, "nodes_loaded": info["nodes"], "model": info["model"], "release": label}

    def _load(self, cluster_id: str, folders: list[Path]) -> dict[str, Any]:
        """Node i of the cluster's inference nodes loads folder i mod k (every one when k is 1)."""
        cluster, nodes = self.inference.inference_nodes(cluster_id)
        if len(nodes) % len(folders):
            raise ServiceError(f"an ensemble of {len(folders)} models needs a multiple of {len(folders)} inference "
                               f"nodes (so each weighs the same); cluster {cluster_id} has {len(nodes)}")
        settings = self.clusters.settings
        results = parallel(lambda i: self.clusters.client(cluster, nodes[i]).load_model(p.LoadRequest(
            path=str(folders[i % len(folders)]), memory_mb=node_memory_mb(nodes[i], settings))), range(len(nodes)))
        errors = [f"{n.id}: {e}" for n, e in zip(nodes, results) if isinstance(e, BaseException)]
        if errors:
            raise ServiceError("loading failed on " + "; ".join(errors))
        return {"nodes": len(nodes), "model": results[0].model_dump()}

    @contextmanager
    def serving_cluster(self, cluster_id: str | None, nodes: int, *, train: bool = False) -> Iterator[str]:
        """The caller's cluster, or a temporary one of ``nodes`` nodes (connected when it will ``train``),
        terminated after."""
        if cluster_id is not None:
            yield cluster_id
            return
        reply = self.clusters.init_cluster(name="registry-eval", topology="star", architecture="mlp",
                                           consensus="proof-of-learning", launcher="subprocess", backend="auto",
                                           max_nodes=nodes, auto_healing=False, wasm_optimization=False,
                                           daa_enabled=False, extra={"registry_temporary": True})
        try:
            self.clusters.deploy_nodes(reply.cluster_id, role="worker", count=nodes, model="base",
                                       capabilities=["training", "inference"] if train else ["inference"],
                                       autonomy=0.0, template="", layers=None)
            if train:
                self.clusters.connect(reply.cluster_id, None)
            yield reply.cluster_id
        finally:
            self.training.terminate_cluster(reply.cluster_id)

    # ------------------------------------------------------------ evaluate
    def evaluate(self, name: str, version: str, dataset: str, cluster_id: str | None) -> dict[str, Any]:
        row = self.release(name, version)
        data = load_eval_set(dataset, self.clusters.settings.allowed_roots)
        parents = len(row.manifest.get("parents") or []) or 1
        with self.serving_cluster(cluster_id, parents) as cid:
            self.serve(cid, f"{PREFIX}{name}@{row.version}")
            report = evaluate(self.inference, cid, data, dataset_key(dataset))
        report = {**report, "measured_at": time.time(), "cluster_id": cluster_id or "temporary"}
        self.releases.add_evaluation(name, row.version, dataset_key(dataset), report)
        return {"name": name, "version": row.version, "report": report}

    # ------------------------------------------------------------ promote / rollback
    def promote(self, name: str, version: str, dataset: str | None, options: g.GateOptions,
                slo: Slo | None = None) -> dict[str, Any]:
        row = self.release(name, version)
        aliases = self.releases.aliases(name)
        stable = self.releases.get(name, aliases["stable"]) if "stable" in aliases else None
        if stable is not None and stable.version == row.version:
            raise ServiceError(f"{name}@{row.version} is already stable")
        changed = stable is not None and stable.manifest.get("contract") != row.manifest.get("contract")
        if changed:  # an incompatible model cannot even be measured on stable's eval set
            results = g.run_gates({"accuracy": 0.0, "latency_p95_ms": 0.0, "robustness": 0.0}, row.manifest["contract"],
                                  None, stable.manifest.get("contract"), options)
            results = [x if x["name"] == "compatibility" else
                       {**x, "passed": False, "value": None, "threshold": None,
                        "detail": "not measured: the contract differs from stable's"} for x in results]
        else:
            dataset = dataset or self._eval_dataset(row, stable)
            candidate = self._evaluation(row, dataset)
            against = self._evaluation(stable, dataset) if stable is not None else None
            results = g.run_gates(candidate, row.manifest["contract"], against,
                                  stable.manifest.get("contract") if stable else None, options)
        self.releases.update(name, row.version, gates=results)
        failed = [x for x in results if not x["passed"]]
        if failed:
            measured = [x for x in failed if x["value"] is not None] or failed
            message = (f"{name}@{row.version} not promoted: "
                       + "; ".join(f"the {x['name']} gate failed ({x['detail']})" for x in measured)
                       + (f"; stable stays {stable.version}" if stable else ""))
            self.clusters.store.add_event("-", "model_promotion_refused", message)
            return {"promoted": False, "gates": results, "stable": stable.version if stable else None,
                    "message": message}
        self.releases.set_aliases(name, {"stable": row.version, "previous": stable.version if stable else None})
        self.releases.update(name, row.version, promoted_at=time.time(), rolled_back_at=None,
                             slo=(slo or Slo()).model_dump())
        message = f"{name}@{row.version} promoted to stable" + (f"; previous is {stable.version}" if stable else "")
        self.clusters.store.add_event("-", "model_promoted", message)
        self._follow_stable(name)
        return {"promoted": True, "gates": results, "stable": row.version, "message": message}

    def _eval_dataset(self, row: ModelRelease, stable: ModelRelease | None) -> str:
        mine = row.evaluations or {}
        shared = [d for d in mine if stable is None or d in (stable.evaluations or {})]
        if not (shared or mine):
            raise ServiceError(f"{row.name}@{row.version} has no evaluation yet; pass dataset (a built-in name or "
                               "examples with labels) or call neural_model_evaluate first")
        return max(shared or mine, key=lambda d: mine[d]["measured_at"])

    def _evaluation(self, row: ModelRelease, dataset: str) -> dict[str, Any]:
        report = (row.evaluations or {}).get(dataset_key(dataset))
        return report if report is not None else self.evaluate(row.name, row.version, dataset, None)["report"]

    def rollback(self, name: str, reason: str = "on request") -> dict[str, Any]:
        aliases = self.releases.aliases(name)
        if "stable" not in aliases:
            raise NotFound(f"model {name} has no stable release to roll back")
        if "previous" not in aliases:
            raise ServiceError(f"model {name} has no previous stable release ({aliases['stable']} is the first); "
                               "nothing to roll back to")
        bad, back = aliases["stable"], aliases["previous"]
        now = time.time()
        self.releases.update(name, bad, rolled_back_at=now)
        earlier = [r for r in self.releases.of(name) if r.promoted_at and not r.rolled_back_at
                   and r.version != back and r.promoted_at < (self.releases.get(name, back).promoted_at or now)]
        before = max(earlier, key=lambda r: r.promoted_at, default=None)
        self.releases.set_aliases(name, {"stable": back, "previous": before.version if before else None})
        message = f"{name}: stable rolled back from {bad} to {back} ({reason})"
        self.clusters.store.add_event("-", "model_rolled_back", message)
        reloaded = self._follow_stable(name)
        return {"name": name, "stable": back, "previous": before.version if before else None, "rolled_back": bad,
                "clusters_reloaded": reloaded, "message": message}

    def observe(self, cluster_id: str, latency_ms: float, failed: bool) -> None:
        """One prediction of a cluster: when it serves NAME@stable and the window breaks the release's SLO,
        stable rolls back (the event says why)."""
        cluster = self.clusters.store.cluster(cluster_id)
        serving = (cluster.options or {}).get("serving_release") if cluster else None
        if not serving or serving.get("ref") != "stable":
            return
        row = self.releases.get(serving["name"], serving["version"])
        if row is None or row.slo is None:
            return
        slo = Slo(**row.slo)
        reason = breach(self.windows.record(cluster_id, latency_ms, failed, slo.window), slo)
        if reason is None:
            return
        with self._rollback_lock:
            aliases = self.releases.aliases(row.name)
            if aliases.get("stable") != row.version or "previous" not in aliases:
                log.warning("%s@%s breaks its SLO on %s (%s); no previous release to roll back to",
                            row.name, row.version, cluster_id, reason)
                return
            self.windows.reset(cluster_id)
            self.rollback(row.name, f"automatic: SLO breach on cluster {cluster_id}: {reason}")

    def _follow_stable(self, name: str) -> list[str]:
        """Clusters serving ``NAME@stable`` load the new stable release."""
        from sqlalchemy import select

        from flow_nexus_server.states import ClusterState
        from flow_nexus_server.store import Cluster

        with self.clusters.store.session() as s:
            rows = list(s.scalars(select(Cluster).where(Cluster.status != ClusterState.TERMINATED)))
        following = [c.id for c in rows if (c.options or {}).get("serving_release", {}).get("name") == name
                     and c.options["serving_release"].get("ref") == "stable"]
        done = []
        for cid in following:
            try:
                self.serve(cid, f"{PREFIX}{name}@stable")
                done.append(cid)
            except ServiceError:
                log.exception("cluster %s could not load the new stable release of %s", cid, name)
        return done

    # ------------------------------------------------------------ fuse
    def fuse(self, name: str, versions: list[str], method: str, notes: str | None = None, dataset: str | None = None,
             cluster_id: str | None = None, epochs: int = STUDENT_EPOCHS) -> dict[str, Any]:
        """``ensemble``: one release listing its parents, served by averaging their class probabilities
        across a cluster's nodes; ``distill``: one student trained on ``dataset`` labelled by that
        ensemble. The parents must share one contract (input, labels, tokenizer)."""
        if method not in ("ensemble", "distill"):
            raise ServiceError(f"fusion method {method!r} is not available; use 'ensemble' or 'distill'")
        if len(set(versions)) < 2:
            raise ServiceError("an ensemble needs at least two different versions")
        parents = [self.release(name, v) for v in versions]
        if any(r.manifest.get("kind") == "ensemble" for r in parents):
            raise ServiceError("an ensemble's parents must be single models; list their versions instead")
        contracts = {mf.sha256_json(r.manifest["contract"]) for r in parents}
        if len(contracts) > 1:
            raise ServiceError("the versions do not share one contract (input spec, label set, tokenizer); only "
                               "compatible models can be fused")
        for parent in parents:
            self._verify(parent)
        if method == "distill":
            return self._distill(name, parents, dataset, cluster_id, epochs, notes)
        with self._lock:
            existing = self.releases.versions(name)
            newest_contract = self.releases.get(name, newest(existing)).manifest.get("contract")
            version = next_version(existing, breaking=newest_contract != parents[0].manifest["contract"])
            staging = self.root / name / f".staging-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o700)
            try:
                manifest = {
                    "name": name, "version": version, "kind": "ensemble", "method": "mean of class probabilities",
                    "created_at": time.time(), "notes": notes, "files": {},
                    "contract": parents[0].manifest["contract"],
                    "parents": [{"name": r.name, "version": r.version, "manifest_sha256": mf.sha256_json(r.manifest),
                                 "provenance": r.manifest.get("provenance")} for r in parents],
                    "metrics": {}, "provenance": {"source": f"fuse {method}", "package_version": __version__},
                }
                reply = self._place(name, staging, manifest)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        self.clusters.store.add_event("-", "model_registered", f"{name}@{version}: an ensemble of "
                                      + ", ".join(versions))
        return reply

    def _distill(self, name: str, parents: list[ModelRelease], dataset: str | None, cluster_id: str | None,
                 epochs: int, notes: str | None) -> dict[str, Any]:
        if not dataset:
            raise ServiceError("distill needs dataset: the transfer set (a built-in name: its training split; or "
                               "examples, whose labels are replaced by the teacher's)")
        transfer = load_eval_set(dataset, self.clusters.settings.allowed_roots, split="train")
        with self.serving_cluster(None, len(parents)) as teacher:
            self._load(teacher, [Path(r.directory) for r in parents])
            labels = teacher_labels(self.inference, teacher, transfer)
        architecture = (parents[0].manifest.get("training_config") or {}).get("architecture")
        with self.serving_cluster(cluster_id, 2, train=True) as student:
            result = train_student(self.training, student, transfer, labels, architecture, epochs,
                                   lambda: self.training.terminate_cluster(student))
            staging = self.root / name / f".staging-{secrets.token_hex(4)}"
            try:
                provenance = sources.fill(self.inference, student, "final", staging)
                extra = {"kind": "distilled", "teacher": {
                    "method": "ensemble (mean of class probabilities), hard labels",
                    "parents": [{"name": r.name, "version": r.version, "manifest_sha256": mf.sha256_json(r.manifest)}
                                for r in parents]},
                    "transfer_set": {"spec": dataset if len(dataset) <= 200 else dataset[:200] + "...",
                                     "examples": len(transfer.inputs), "sha256": mf.sha256_json(transfer.inputs)},
                    "student": result}
                with self._lock:
                    return self._publish(name, staging, provenance, notes, extra)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def _place(self, name: str, staging: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        target = self.root / name / manifest["version"]
        if target.exists():
            raise ServiceError(f"{target} already exists; it is not a registered release: move it away")
        staging.chmod(0o700)
        mf.write(staging, manifest)
        staging.rename(target)
        self.releases.add(name, manifest["version"], str(target), manifest)
        return {"name": name, "version": manifest["version"], "directory": str(target), "manifest": manifest}
