"""MCP prompts: call-by-call recipes for the common flows, each call written as the tool's name and
its JSON arguments so a model can follow it as is (tests/test_mcp_surface.py checks every name and
argument against the tool schemas)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from pydantic import Field

from workers.protocol import BUILTIN_DATASETS

# The architecture each built-in corpus trains well with, as the shipped templates pair them.
BUILTIN_ARCHITECTURE = {"digits": "mlp", "mnist-5k": "cnn", "tweet-sentiment": "transformer",
                        "tweet-polarity": "transformer", "bbc-news": "rnn", "bbc-news-lm": "transformer"}

Nodes = Annotated[int, Field(ge=1, le=16, description="How many worker nodes to deploy")]


def call(tool: str, **arguments: Any) -> str:
    """One step: the tool's name and its arguments as JSON ("<...>" marks a value from an earlier reply)."""
    return f"{tool} {json.dumps(arguments)}"


def steps(*lines: str) -> str:
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


def federated_private_data(
    dataset: Annotated[str, Field(min_length=1, max_length=255, description=(
        "File name every worker's own data is uploaded under, e.g. data/train.csv (CSV with a label column, "
        "JSONL or TXT)"))],
    nodes: Nodes = 3,
    rounds: Annotated[int, Field(ge=1, le=1000, description="Federated rounds")] = 5,
    architecture: Annotated[Literal["mlp", "cnn", "rnn", "transformer"], Field(description=(
        "Model family: mlp for numeric columns, transformer or rnn for a text column"))] = "mlp",
) -> str:
    cluster = "<cluster_id>"
    return (
        "Train one model with federated averaging on data that never leaves the node holding it. Every step is a "
        "tool call of this server; \"<...>\" stands for a value an earlier reply returned.\n" + steps(
            call("neural_cluster_init", name="federated-private", topology="star", architecture=architecture,
                 consensus="proof-of-learning") + ": keep the reply's cluster_id.",
            call("neural_node_deploy", cluster_id=cluster, role="aggregator")
            + ": the aggregator combines the workers' models and never reads their data.",
            call("neural_node_deploy", cluster_id=cluster, role="worker", count=nodes)
            + ": keep the node_id of each entry of the reply's nodes.",
            "For each worker: " + call("neural_node_upload", node_id="<worker node_id>", file_name=dataset,
                                       content="<this worker's own records>")
            + ". Use the same file name on every worker; only that node can read its file (large or binary "
              "files: base64 with \"encoding\": \"base64\").",
            call("neural_cluster_connect", cluster_id=cluster) + ": forms the process group.",
            call("neural_train_distributed", cluster_id=cluster, dataset=dataset, federated=True, rounds=rounds,
                 local_epochs=1) + f": each worker reads {dataset} in its own sandbox; keep the session_id.",
            "Repeat " + call("neural_training_status", session_id="<session_id>")
            + " until its status is completed (or failed / stopped): progress and metrics per round; "
            + call("neural_cluster_status", cluster_id=cluster) + " shows the nodes.",
            call("neural_predict_distributed", cluster_id=cluster, input_data="<examples as JSON, shaped like the "
                 "training records without their label>") + ": every inference node answers with the global model.",
            call("neural_cluster_terminate", cluster_id=cluster) + ": stops every node when you are done."))


def synchronous_training(
    dataset: Annotated[str, Field(description="Built-in dataset: " + ", ".join(BUILTIN_DATASETS))] = "digits",
    nodes: Nodes = 2,
    epochs: Annotated[int, Field(ge=1, le=1000, description="Training epochs")] = 10,
) -> str:
    if dataset not in BUILTIN_DATASETS:
        raise ValueError(f"dataset must be a built-in dataset: {', '.join(BUILTIN_DATASETS)}")
    cluster = "<cluster_id>"
    return (
        f"Train a model (architecture {BUILTIN_ARCHITECTURE[dataset]}) on the built-in dataset {dataset} "
        f"({BUILTIN_DATASETS[dataset]}) with synchronous data parallelism: every step all {nodes} workers "
        f"average their gradients. \"<...>\" stands for a value an earlier reply returned.\n" + steps(
            call("neural_cluster_init", name=f"sync-{dataset}", topology="ring",
                 architecture=BUILTIN_ARCHITECTURE[dataset]) + ": keep the reply's cluster_id.",
            call("neural_node_deploy", cluster_id=cluster, role="worker", count=nodes),
            call("neural_cluster_connect", cluster_id=cluster) + ": forms the process group and measures each link.",
            call("neural_train_distributed", cluster_id=cluster, dataset=dataset, epochs=epochs, wait=True)
            + ": blocks with progress notifications; keep the session_id. If the reply's status is still running, "
              "repeat " + call("neural_training_status", session_id="<session_id>") + " until it is completed.",
            call("neural_training_plot", session_id="<session_id>") + ": loss and accuracy per epoch.",
            call("neural_predict_distributed", cluster_id=cluster, input_data="<examples as JSON: feature vectors "
                 "or images for digits and mnist-5k, raw text for the text datasets>"),
            call("neural_cluster_terminate", cluster_id=cluster) + ": stops every node when you are done."))


def evaluate_and_export(
    model_id: Annotated[str, Field(min_length=1, max_length=64, description=(
        "The trained model: a cluster id (its current model) or a checkpoint id (ckpt_...)"))],
    cluster_id: Annotated[str | None, Field(max_length=64, description=(
        "Cluster to load the exported model into (default: a new one)"))] = None,
) -> str:
    target = cluster_id or "<new cluster_id>"
    serving = [] if cluster_id else [
        call("neural_cluster_init", name="serving") + ", then "
        + call("neural_node_deploy", cluster_id=target, role="worker", capabilities=["inference"])
        + ": a cluster with an inference node to serve the export."]
    return (
        f"Measure the model {model_id}, export it, and serve the export from a cluster. \"<...>\" stands for a "
        f"value an earlier reply returned.\n" + steps(
            call("neural_performance_benchmark", model_id=model_id, benchmark_type="comprehensive")
            + ": latency p50/p95/p99, throughput, model size, memory, and accuracy on the held-out split (or on "
              "labelled input_data).",
            call("neural_model_export", model_id=model_id, format="safetensors")
            + ": keep the reply's directory (weights, config, label map, model card).",
            *serving,
            call("neural_model_load", cluster_id=target, path="<export directory>")
            + ": every inference node of the cluster loads it; no training needed.",
            call("neural_predict_distributed", cluster_id=target, input_data="<examples as JSON in the model's "
                 "input form>") + ": check that the loaded model answers."))


def deploy_template(
    template_id: Annotated[str, Field(min_length=1, max_length=100, description="Id from neural_list_templates")],
) -> str:
    return (
        f"Build the ready-made cluster {template_id} and train it. \"<...>\" stands for a value an earlier reply "
        f"returned.\n" + steps(
            call("neural_deploy_template", template_id=template_id, custom_config={"train": True})
            + ": init, deploy, connect and start the template's training in one call; keep cluster_id and "
              "training.session_id.",
            call("neural_training_status", session_id="<session_id>") + ": repeat until completed.",
            call("neural_cluster_terminate", cluster_id="<cluster_id>") + ": stops every node when you are done."))


def diagnose_node(
    node_id: Annotated[str, Field(min_length=1, max_length=64, description="The node to look at")],
) -> str:
    return (
        f"Find out why node {node_id} misbehaves and get its cluster going again.\n" + steps(
            call("neural_node_logs", node_id=node_id, tail=200) + ": the end of its log (tracebacks, refusals).",
            call("neural_cluster_status", cluster_id="<its cluster_id>") + ": alive, pid, memory and heartbeat of "
            "every node.",
            "If it cannot recover: " + call("neural_node_remove", node_id=node_id) + ", then "
            + call("neural_node_deploy", cluster_id="<its cluster_id>", role="worker") + " and "
            + call("neural_cluster_connect", cluster_id="<its cluster_id>") + "."))


def register(mcp: MCPServer) -> None:
    mcp.prompt(name="federated_private_data", title="Federated training on private per-node data", description=(
        "Init, deploy an aggregator and workers, upload each worker's own file, connect, train federated on "
        "that file, follow the session, predict, terminate"))(federated_private_data)
    mcp.prompt(name="synchronous_training", title="Synchronous data-parallel training", description=(
        "Train on a built-in dataset with every worker averaging gradients each step"))(synchronous_training)
    mcp.prompt(name="evaluate_and_export", title="Evaluate, export and serve a model", description=(
        "Benchmark a trained model, export it, load the export into a cluster and predict"))(evaluate_and_export)
    mcp.prompt(name="deploy_template", title="Deploy a template", description=(
        "Build and train a ready-made cluster from neural_list_templates"))(deploy_template)
    mcp.prompt(name="diagnose_node", title="Diagnose a node", description=(
        "Read a node's log and status, and replace it if it cannot recover"))(diagnose_node)
