"""Services speak of the domain and never of tools: they name a next step (NextStep), and the tool
layer turns it into the tool call the client reads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import err, ok
from mcp import Client

from flow_nexus_server import service
from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service.errors import NextStep
from flow_nexus_server.tools.common import NEXT_STEP_HINTS

pytestmark = pytest.mark.anyio


async def tool_names(home: Path) -> set[str]:
    async with Client(build_server(Settings.from_env(home))) as client:
        return {t.name for t in (await client.list_tools()).tools}


def documentation(tree: ast.AST) -> set[int]:
    """ids of the docstrings and schema descriptions: they may name a tool, a message may not."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
        if isinstance(node, ast.keyword) and node.arg == "description":
            docs.add(id(node.value))
    return docs


async def test_no_service_string_names_a_tool(home):
    names = await tool_names(home)
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    found = []
    for path in sorted(Path(service.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        docs = documentation(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                    and pattern.search(node.value)):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


async def test_every_next_step_names_a_tool(home):
    names = await tool_names(home)
    assert set(NEXT_STEP_HINTS) == set(NextStep)
    for step, hint in NEXT_STEP_HINTS.items():
        assert any(name in hint for name in names), step


async def test_service_errors_and_replies_reach_the_client_with_their_tool(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        missing = await err(client, "neural_cluster_status", {"cluster_id": "dnc_none"})
        assert missing.endswith("cluster 'dnc_none' does not exist; call neural_cluster_list to see clusters or "
                                "neural_cluster_init to create one"), missing
        init = await ok(client, "neural_cluster_init", {"name": "hints"})
        cid = init["cluster_id"]
        assert init["next_step"] == f"deploy nodes with neural_node_deploy(cluster_id='{cid}')"
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert status["group_state"] == "not_connected"
        assert status["group_message"] == ("no process group is formed yet; call neural_cluster_connect to form "
                                           "the process group")
        connect = await err(client, "neural_cluster_connect", {"cluster_id": cid})
        assert connect.endswith(f"cluster {cid} has no nodes; call neural_node_deploy first"), connect
        train = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits"})
        assert train.endswith(f"cluster {cid} is not connected (status initializing); call neural_cluster_connect "
                              "to form the process group"), train
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        gone = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert gone["group_message"] == "the cluster is terminated"
        terminated = await err(client, "neural_cluster_connect", {"cluster_id": cid})
        expected = f"cluster {cid} is terminated; create a new one with neural_cluster_init"
        assert terminated.endswith(expected), terminated
