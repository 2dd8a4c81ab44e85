"""Model registry tools: register, list, get, evaluate, promote, rollback, fuse."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server import MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.registry.gates import GateOptions
from flow_nexus_server.registry.slo import Slo
from flow_nexus_server.tools.common import CREATES, READ_ONLY, REPLACES, App, call, tool

# Moves `stable`: clusters serving NAME@stable then answer with another model; the same call again differs.
MOVES_STABLE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                               open_world_hint=False)

ModelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 description="Registered model name (letters, digits, '.', '_', '-')")]
Version = Annotated[str, Field(min_length=1, max_length=32, description=(
    "A semantic version (1.2.0) or an alias: stable, previous"))]
EvalDataset = Annotated[str, Field(min_length=1, max_length=4_000_000, description=(
    "A built-in dataset (its held-out split: validation 20%, seed 0) or examples with labels: a .json/.jsonl/.csv "
    "file under the allowed roots or inline JSON {\"inputs\": [...], \"labels\": [...]}"))]


def register(mcp: MCPServer, app: App) -> None:
    @tool(mcp, title="Register a model version", annotations=CREATES)
    async def neural_model_register(
        source: Annotated[str, Field(min_length=1, max_length=4096, description=(
            "A cluster id (the model it serves now), a training session id (its final checkpoint, or its best "
            "with checkpoint='best'), a checkpoint id, or an export / release directory"))],
        name: ModelName,
        notes: Annotated[str | None, Field(max_length=4000, description="Free text kept in the manifest")] = None,
        checkpoint: Annotated[Literal["final", "best"], Field(description=(
            "For a session source: its last checkpoint, or the one at its lowest val_loss"))] = "final",
    ) -> r.RegisterReply:
        """Create the next semantic version of `name` (1.0.0, 1.1.0...; a changed input/label/tokenizer contract
        bumps the major) in a release folder with an immutable manifest.json: every artifact with its sha256, the
        model card, training config, dataset fingerprint, metrics and provenance. A release folder copied from
        another machine registers unchanged."""
        out = await call(app.registry.register, source, name, notes, checkpoint)
        return r.RegisterReply(success=True, **out)

    @tool(mcp, title="List registered models", annotations=READ_ONLY)
    async def neural_model_list(
        name: Annotated[str | None, Field(max_length=64, description="One model's versions (default: all)")] = None,
    ) -> r.ModelListReply:
        """Versions with their aliases (stable, previous), last gate results and evaluation reports."""
        return r.ModelListReply(success=True, releases=await call(app.registry.list, name))

    @tool(mcp, title="Show a model version", annotations=READ_ONLY)
    async def neural_model_get(name: ModelName, version: Version) -> r.ModelGetReply:
        """One version with its manifest, aliases, gate results and evaluation reports."""
        return r.ModelGetReply(success=True, release=await call(app.registry.get, name, version))

    @tool(mcp, title="Evaluate a model version", annotations=REPLACES)
    async def neural_model_evaluate(
        name: ModelName,
        version: Version,
        dataset: EvalDataset,
        cluster_id: Annotated[str | None, Field(max_length=64, description=(
            "Serving cluster to measure through (it then serves this version); default: a temporary cluster, "
            "terminated after"))] = None,
    ) -> r.EvaluateReply:
        """The canonical evaluation, stored with the version: accuracy and macro F1, latency p50/p95 through a
        serving cluster, model size, and robustness (accuracy under a fixed perturbation: Gaussian noise for
        features and images, character typos for text)."""
        out = await call(app.registry.evaluate, name, version, dataset, cluster_id)
        return r.EvaluateReply(success=True, **out)

    @tool(mcp, title="Promote a model version to stable", annotations=MOVES_STABLE)
    async def neural_model_promote(
        name: ModelName,
        version: Version,
        dataset: Annotated[str | None, Field(max_length=4_000_000, description=(
            "Evaluation set of the gates (evaluated first where missing); default: the version's latest "
            "evaluation that stable also has"))] = None,
        gates: Annotated[GateOptions | None, Field(description="Gate thresholds (defaults: the registry's policy)")
                         ] = None,
        slo: Annotated[Slo | None, Field(description=(
            "The release's service-level objectives once stable: when a cluster serving NAME@stable breaks one over "
            "the window of its last predictions, stable rolls back by itself (default: error rate 0.1, p95 "
            "5000 ms, 20 predictions)"))] = None,
    ) -> r.PromoteReply:
        """Run the gates against the current stable (floors for a first release): quality (accuracy >= stable -
        tolerance), latency (p95 <= stable x 1.2), compatibility (same input spec, labels, tokenizer), safety
        (robustness >= stable - tolerance, no NaN). Promotes only if all pass (stable's release becomes
        previous); a refusal is a successful call with promoted false naming the failing gate. Once stable, an
        SLO breach on a cluster serving NAME@stable rolls it back by itself."""
        out = await call(app.registry.promote, name, version, dataset, gates or GateOptions(), slo)
        return r.PromoteReply(success=True, **out)

    @tool(mcp, title="Roll back a model's stable release", annotations=MOVES_STABLE)
    async def neural_model_rollback(name: ModelName) -> r.RollbackReply:
        """stable goes back to the previous stable release; clusters serving NAME@stable load it."""
        return r.RollbackReply(success=True, **await call(app.registry.rollback, name))

    @tool(mcp, title="Fuse model versions", annotations=CREATES)
    async def neural_model_fuse(
        name: ModelName,
        versions: Annotated[list[str], Field(min_length=2, max_length=16, description=(
            "Versions of `name` to fuse (same input spec, labels and tokenizer)"))],
        method: Annotated[Literal["ensemble", "distill"], Field(description=(
            "ensemble: one release listing its parents, served by averaging their class probabilities across "
            "the nodes of a serving cluster (node i holds parent i mod k); distill: one student trained through a "
            "cluster on `dataset` labelled by that ensemble (the teacher), recorded with both"))] = "ensemble",
        notes: Annotated[str | None, Field(max_length=4000, description="Free text kept in the manifest")] = None,
        dataset: Annotated[str | None, Field(max_length=4_000_000, description=(
            "distill: the transfer set, a built-in dataset (its training split) or examples (their labels are "
            "replaced by the teacher's)"))] = None,
        cluster_id: Annotated[str | None, Field(max_length=64, description=(
            "distill: the cluster that trains the student (default: a temporary one of 2 nodes)"))] = None,
        epochs: Annotated[int, Field(ge=1, le=200, description="distill: the student's epochs")] = 8,
    ) -> r.RegisterReply:
        """Publish one release from several compatible versions (e.g. trained at different sites). ensemble: its
        manifest lists the parents with their manifests' sha256; distill: a single model trained on the
        ensemble's answers, its manifest naming the teacher and the transfer set. Either goes through the same
        evaluate and promote gates."""
        out = await call(app.registry.fuse, name, versions, method, notes, dataset, cluster_id, epochs)
        return r.RegisterReply(success=True, **out)
