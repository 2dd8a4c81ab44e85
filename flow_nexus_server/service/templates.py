"""Cluster templates: data files in the package, listed, searched and deployed in one call."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Literal, get_args

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flow_nexus_server import replies as r
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.errors import NextStep, NotFound, ServiceError
from flow_nexus_server.service.training import TrainingService, training_options
from workers import protocol as p

Category = Literal["timeseries", "classification", "regression", "nlp", "vision", "anomaly", "generative",
                   "reinforcement", "custom"]
CATEGORIES: tuple[Category, ...] = get_args(Category)


class NodeGroup(BaseModel):
    role: str
    count: int = Field(ge=1, le=16)
    model: str = "base"


class Template(BaseModel):
    id: str
    name: str
    category: str
    tier: str = "free"
    description: str
    tags: list[str] = Field(default_factory=list)
    cluster: dict[str, Any]
    nodes: list[NodeGroup]
    training: dict[str, Any] | None = None


@lru_cache(maxsize=1)
def catalog() -> dict[str, Template]:
    folder = resources.files("flow_nexus_server") / "templates"
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            t = Template.model_validate(json.loads(entry.read_text(encoding="utf-8")))
            out[t.id] = t
    return out


def list_templates(category: str | None, tier: str | None, search: str | None, limit: int) -> r.TemplateListReply:
    rows = list(catalog().values())
    if category:
        rows = [t for t in rows if t.category == category]
    if tier:
        rows = [t for t in rows if t.tier == tier]
    if search:
        words = search.lower().split()
        rows = [t for t in rows if all(w in " ".join([t.id, t.name, t.description, *t.tags]).lower() for w in words)]
    return r.TemplateListReply(success=True, templates=[info(t) for t in rows[:limit]], count=min(len(rows), limit),
                               total_matching=len(rows))


def info(t: Template) -> r.TemplateInfo:
    return r.TemplateInfo(id=t.id, name=t.name, category=t.category, tier=t.tier, description=t.description,
                          tags=t.tags, cluster=t.cluster, nodes=[g.model_dump() for g in t.nodes],
                          training=t.training)


def resolve_template(template_id: str) -> Template | None:
    """A template by its id or by the Flow Nexus guides' spelling of it (``tmpl_transformer_large``
    is ``transformer-large``)."""
    found = catalog()
    guide = template_id.removeprefix("tmpl_").replace("_", "-")
    return found.get(template_id) or found.get(guide)


# Parameters of each transformer preset as a GPT-2 language model on the built-in corpus (a BPE
# vocabulary of about 4,000 tokens, 128 positions, tied output); tests/test_guides_surface.py builds
# them to check.
PRESET_PARAMETERS: dict[str, int] = {"base": 925_184, "large": 4_216_320, "xl": 88_226_304}
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}
TRAIN_COPIES = 9  # float32 copies of the weights training holds per node (workers.budget: measured 8.7)


def parse_model_size(text: str | int) -> int:
    """'125M' -> 125,000,000 parameters (K, M, B suffixes; a bare number is parameters)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", str(text).upper())
    if not m:
        raise ServiceError(f"custom_config.model_size {text!r} is not a parameter count; write e.g. '125M', '1.3B' "
                           "or '800K'")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


def nearest_preset(asked: int, nodes: int, available_mb: float) -> tuple[str, dict[str, Any]]:
    """The transformer preset nearest ``asked`` parameters (by ratio), refused with the numbers when
    training it on ``nodes`` nodes would not fit ``available_mb`` of host memory."""
    preset = min(PRESET_PARAMETERS, key=lambda k: abs(math.log(PRESET_PARAMETERS[k] / max(1, asked))))
    params = PRESET_PARAMETERS[preset]
    need_mb = params * 4 * TRAIN_COPIES / 2**20 * nodes
    if need_mb > available_mb:
        raise ServiceError(f"model_size {asked:,} parameters maps to preset {preset!r} ({params:,} parameters), which "
                           f"needs about {need_mb:,.0f} MB to train on {nodes} nodes ({TRAIN_COPIES} float32 copies "
                           f"each) and this host has {available_mb:,.0f} MB available; ask for fewer nodes or a "
                           "smaller model_size")
    note = {"asked_parameters": asked, "preset": preset, "preset_parameters": params,
            "message": (f"model_size {asked:,} parameters: the nearest transformer preset is {preset!r} "
                        f"({params:,} parameters as a language model on the built-in corpus); "
                        f"presets: {', '.join(f'{k} {v:,}' for k, v in PRESET_PARAMETERS.items())}")}
    return preset, note


class CustomConfig(BaseModel):
    """What a template deployment's custom_config may change; strict, so "false" is not true."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(None, min_length=1, max_length=200)
    topology: p.Topology | None = None
    architecture: p.ArchitectureChoice | None = None
    consensus: p.Consensus | None = None
    auto_healing: bool = False
    max_nodes: int | None = Field(None, ge=1, le=1000)
    workers: int | None = Field(None, ge=1, le=64)
    num_workers: int | None = Field(None, ge=1, le=64, description="Alias of workers (the Flow Nexus guides)")
    num_parameter_servers: int | None = Field(None, ge=0, le=16, description="Parameter-server nodes")
    model_size: str | int | None = Field(None, description="Parameter count such as '125M': the nearest preset")
    train: bool = False
    training: dict[str, Any] | None = Field(None, description="neural_train_distributed arguments")


def sized_groups(t: Template, cfg: CustomConfig) -> list[NodeGroup]:
    """The template's node groups with custom_config's counts of workers and parameter servers."""
    groups = [g.model_copy() for g in t.nodes if g.role != "parameter_server" or cfg.num_parameter_servers != 0]
    workers = cfg.num_workers if cfg.num_workers is not None else cfg.workers
    for g in groups:
        if g.role == "worker" and workers is not None:
            g.count = workers
        if g.role == "parameter_server" and cfg.num_parameter_servers:
            g.count = cfg.num_parameter_servers
    if cfg.num_parameter_servers and not any(g.role == "parameter_server" for g in groups):
        model = next((g.model for g in groups if g.role == "worker"), "base")
        groups.insert(0, NodeGroup(role="parameter_server", count=cfg.num_parameter_servers, model=model))
    return groups


def available_memory_mb() -> float:
    return psutil.virtual_memory().available / 2**20


def deploy_template(clusters: ClusterService, training: TrainingService, template_id: str,
                    custom: dict[str, Any] | None) -> r.TemplateDeployReply:
    t = resolve_template(template_id)
    if t is None:
        raise NotFound(f"template {template_id!r} does not exist (templates: {', '.join(catalog())})",
                       next_step=NextStep.LIST_TEMPLATES)
    try:
        cfg = CustomConfig.model_validate(custom or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'custom_config'}: {e['msg']}" for e in exc.errors())
        raise ServiceError(f"custom_config is invalid: {problems}. Allowed keys: "
                           f"{', '.join(CustomConfig.model_fields)}") from exc
    if refusal := p.architecture_refusal(cfg.architecture):
        raise ServiceError(refusal)
    # the same options model and bounds as a training call's, checked before any node starts
    options = training_options({**t.training, **(cfg.training or {})}) if cfg.train and t.training else None
    groups = sized_groups(t, cfg)
    total = sum(g.count for g in groups)
    size_note = None
    if cfg.model_size is not None:
        preset, size_note = nearest_preset(parse_model_size(cfg.model_size), total, available_memory_mb())
        for g in groups:
            g.model = preset
    cluster_args = {"topology": "mesh", "architecture": "transformer", "consensus": "proof-of-learning", **t.cluster}
    for key in ("topology", "architecture", "consensus"):
        if getattr(cfg, key) is not None:
            cluster_args[key] = getattr(cfg, key)
    max_nodes = cfg.max_nodes or max(100, total)
    if max_nodes < total:
        raise ServiceError(f"custom_config.max_nodes {max_nodes} is below the {total} nodes template {t.id} deploys")
    init = clusters.init_cluster(
        name=cfg.name or t.name, launcher="subprocess", backend="auto", max_nodes=max_nodes,
        auto_healing=cfg.auto_healing, wasm_optimization=True, daa_enabled=True, extra={"template": t.id},
        **cluster_args,
    )
    try:
        deployed = [clusters.deploy_nodes(init.cluster_id, role=g.role, count=g.count, model=g.model,
                                          capabilities=["training", "inference"], autonomy=0.8, template=t.id,
                                          layers=None) for g in groups]
        connect = clusters.connect(init.cluster_id)
        started = None
        if cfg.train:
            if options is None:
                raise ServiceError(f"template {t.id} has no training recipe", next_step=NextStep.TRAIN)
            started = training.start(init.cluster_id, options)
    except ServiceError as exc:
        clusters.terminate(init.cluster_id, reason=f"template {t.id} failed to deploy")
        raise ServiceError(f"deploying template {t.id} failed and its cluster was terminated: {exc}",
                           next_step=exc.next_step) from exc
    return r.TemplateDeployReply(
        success=True, template_id=t.id, cluster_id=init.cluster_id, cluster=init,
        nodes=[n for d in deployed for n in d.nodes], connection=connect, training=started,
        suggested_training={"cluster_id": init.cluster_id, **(t.training or {})} if t.training else None,
        model_size=size_note,
    )


__all__ = ["CATEGORIES", "catalog", "deploy_template", "list_templates", "ValidationError"]
