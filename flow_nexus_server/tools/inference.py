"""Inference tools: predict, benchmark, export and load models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.service.prediction import Method
from flow_nexus_server.tools.common import (
    CREATES,
    READ_ONLY,
    REPLACES,
    App,
    ClusterId,
    call,
    model_fields_as_parameters,
    tool,
)
from workers import protocol as p
from workers.protocol import ExportFormat


def register(mcp: MCPServer, app: App) -> None:
    @tool(mcp, title="Predict with the cluster", annotations=READ_ONLY)
    @model_fields_as_parameters(p.GenerationOptions)
    async def neural_predict_distributed(
        cluster_id: ClusterId,
        input_data: Annotated[str, Field(min_length=1, max_length=4_000_000, description=(
            "JSON: one example or a batch in the model's input form (raw text for text models, feature vectors "
            "or images otherwise), optionally {\"inputs\": [...], \"labels\": [...]}; or a path to a "
            ".json/.jsonl/.csv/.txt file of examples; or plain text for a text model"))],
        aggregation: Annotated[Method | None, Field(description=(
            "mean of class probabilities (default), majority vote, confidence-weighted vote, or ensemble "
            "(averaging, with each node's vote and confidence). A language model: ensemble (and mean) decode "
            "jointly, averaging the nodes' next-token distributions at every step; majority / weighted choose among "
            "the nodes' own continuations"))] = None,
        mode: Annotated[Literal["replicate", "shard"], Field(description=(
            "replicate: every node answers every example; shard: the batch is split across nodes"))] = "replicate",
        model: Annotated[Literal["global", "local"], Field(description=(
            "global model, or each node's local pre-aggregation model (after federated training)"))] = "global",
        quantized: Annotated[bool | None, Field(description="Serve the int8 copy (default: the training's "
                                                            "quantization setting)")] = None,
        **generation: Any,
    ) -> r.PredictReply:
        """Every node with the inference capability runs the model it holds; the server combines the answers.
        A language model continues the text instead (max_new_tokens, temperature, top_k, top_p, seed);
        aggregation ensemble/mean decodes jointly, averaging the nodes' next-token distributions at every step."""
        options = p.GenerationOptions.model_validate(generation)
        return await call(app.inference.predict, cluster_id, input_data, aggregation or "mean", mode, model, quantized,
                          options)

    @tool(mcp, title="Benchmark a model", annotations=READ_ONLY)
    async def neural_performance_benchmark(
        model_id: Annotated[str, Field(min_length=1, max_length=64, description="A cluster id or a checkpoint id")],
        benchmark_type: Annotated[Literal["inference", "throughput", "memory", "comprehensive"], Field(description=(
            "Which figures to measure; comprehensive: all of them plus the cluster's all-reduce timings"))
        ] = "comprehensive",
        input_data: Annotated[str, Field(max_length=4_000_000, description=(
            "Examples (with labels for accuracy) as for neural_predict_distributed; empty: the held-out split "
            "for node measurements (end-to-end latency needs examples)"))] = "",
        runs: Annotated[int, Field(ge=5, le=2000, description="Timed runs per latency figure")] = 50,
        quantized: Annotated[bool | None, Field(description="Also measure the int8 copy (memory, latency, accuracy "
                                                            "change)")] = None,
    ) -> r.BenchmarkResult:
        """Measured latency p50/p95/p99, throughput, model size, peak RSS per node, all-reduce figures."""
        result = await call(app.inference.benchmark, model_id, benchmark_type, input_data or None, runs, quantized)
        if benchmark_type == "comprehensive" and not model_id.startswith("ckpt_"):
            result.collectives = [c.model_dump() for c in await call(app.clusters.collective_benchmark, model_id)]
        return result

    @tool(mcp, title="Export a model", annotations=CREATES)
    async def neural_model_export(
        model_id: Annotated[str, Field(min_length=1, max_length=64, description="A cluster id or a checkpoint id")],
        format: Annotated[ExportFormat, Field(description=(
            "safetensors: weights, config and model card; torchscript: also a traced model.torchscript.pt for other "
            "runtimes (this server never loads it); pytorch: also model.pt, a plain state dict for "
            "torch.load(weights_only=True); huggingface (language models): the transformers layout, "
            "loadable with AutoModelForCausalLM / AutoTokenizer.from_pretrained"))] = "safetensors",
        destination: Annotated[str | None, Field(max_length=4096, description=(
            "Directory under the state home or FLOW_NEXUS_DATA_ROOTS (default: <home>/exports/<id>-<time>)"))] = None,
    ) -> r.ExportReply:
        """Write weights, config, tokenizer/label map and a model card with the metrics it was trained to."""
        return await call(app.inference.export, model_id, format, destination)

    @tool(mcp, title="Load a model into a cluster", annotations=REPLACES)
    async def neural_model_load(
        cluster_id: ClusterId,
        path: Annotated[str, Field(min_length=1, max_length=4096, description=(
            "An export directory (this server's, or a Hugging Face GPT-2 directory with model.safetensors and "
            "tokenizer.json), a checkpoint file, a checkpoint id, or a registry release: registry:NAME@stable, "
            "registry:NAME@previous or registry:NAME@1.2.0 (its sha256s verified first; an ensemble's parents "
            "are spread across the nodes)"))],
    ) -> r.LoadReply:
        """Every inference node of the cluster loads the model; no training needed before predicting."""
        if path.startswith("registry:"):
            out = await call(app.registry.serve, cluster_id, path)
            return r.LoadReply(success=True, cluster_id=cluster_id, **out)
        return await call(app.inference.load, cluster_id, path)
