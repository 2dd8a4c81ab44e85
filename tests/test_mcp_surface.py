"""The MCP surface beyond tools: prompts whose every call is a real tool call, logging/setLevel,
argument completion of ids."""

from __future__ import annotations

import json
import logging
import re

import jsonschema
import pytest
from conftest import ok
from mcp import Client, MCPError
from mcp.types import CompletionArgument, CompletionContext, PromptReference, ResourceTemplateReference

from flow_nexus_server.completions import MAX_VALUES, complete_ids
from flow_nexus_server.config import Settings
from flow_nexus_server.log_level import PACKAGE_LOGGER
from flow_nexus_server.prompts import BUILTIN_ARCHITECTURE
from flow_nexus_server.server import build_server
from flow_nexus_server.store import Checkpoint, Cluster, Store, TrainingSession
from workers.protocol import BUILTIN_DATASETS

pytestmark = pytest.mark.anyio

TOOL_NAME = re.compile(r"\b(?:neural|execution)_\w+")
# Values for a prompt's required arguments; any string serves, the recipe just quotes it.
SAMPLE_ARGUMENTS = {"dataset": "data/train.csv", "model_id": "dnc_sample", "template_id": "sync-digits",
                    "node_id": "node_sample"}


def tool_calls(text: str) -> list[tuple[str, dict]]:
    """Every "tool_name {json}" step of a recipe, with its arguments parsed."""
    decoder = json.JSONDecoder()
    calls = []
    for match in TOOL_NAME.finditer(text):
        if text.startswith(" {", match.end()):
            arguments, _ = decoder.raw_decode(text, match.end() + 1)
            calls.append((match.group(), arguments))
    return calls


async def rendered_prompts(client: Client) -> list[tuple[str, str]]:
    """(description, text) of every prompt with its required arguments, plus the variants that take
    another branch: each built-in dataset, and a serving cluster that already exists."""
    variants = []
    for prompt in (await client.list_prompts()).prompts:
        required = {a.name: SAMPLE_ARGUMENTS[a.name] for a in prompt.arguments or [] if a.required}
        variants.append((prompt.name, required))
    variants += [("synchronous_training", {"dataset": name, "nodes": "3"}) for name in BUILTIN_DATASETS]
    variants.append(("evaluate_and_export", {"model_id": "ckpt_sample", "cluster_id": "dnc_serving"}))
    rendered = []
    for name, arguments in variants:
        result = await client.get_prompt(name, arguments)
        rendered.append((f"{name} {arguments}", "\n".join(m.content.text for m in result.messages)))
    return rendered


async def test_prompts_call_only_real_tools_with_real_arguments(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        assert client.server_capabilities.prompts is not None
        names = {p.name for p in (await client.list_prompts()).prompts}
        assert {"federated_private_data", "synchronous_training", "evaluate_and_export"} <= names
        schemas = {t.name: t.input_schema for t in (await client.list_tools()).tools}
        for which, text in await rendered_prompts(client):
            assert set(TOOL_NAME.findall(text)) <= set(schemas), f"{which} names a tool that does not exist"
            calls = tool_calls(text)
            assert len(calls) >= 3, f"{which}: no call-by-call recipe"
            for tool, arguments in calls:
                assert set(arguments) <= set(schemas[tool]["properties"]), f"{which}: {tool} {arguments}"
                jsonschema.validate(arguments, schemas[tool])  # names, types, enums and required arguments
        federated = dict(await rendered_prompts(client))["federated_private_data {'dataset': 'data/train.csv'}"]
        train = next(args for tool, args in tool_calls(federated) if tool == "neural_train_distributed")
        assert train["federated"] is True and train["dataset"] == "data/train.csv"
        with pytest.raises(MCPError):
            await client.get_prompt("synchronous_training", {"dataset": "wikitext-103"})
    assert set(BUILTIN_ARCHITECTURE) == set(BUILTIN_DATASETS)


@pytest.fixture
def restore_package_log_level():
    level = PACKAGE_LOGGER.level
    yield
    PACKAGE_LOGGER.setLevel(level)


# The client API warns that logging is deprecated at 2026-07-28; 2025-era clients still send it.
@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_set_level_moves_the_package_log_threshold(home, caplog, restore_package_log_level):
    event = logging.getLogger("flow_nexus_server.service.training")
    async with Client(build_server(Settings.from_env(home)), mode="legacy") as client:
        assert client.server_capabilities.logging is not None
        await client.set_logging_level("error")
        event.warning("a warning while the level is error")
        await client.set_logging_level("debug")
        event.debug("a debug line while the level is debug")
    logged = [r.getMessage() for r in caplog.records]
    assert "a warning while the level is error" not in logged
    assert "a debug line while the level is debug" in logged


async def test_completion_offers_store_ids_newest_first(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        assert client.server_capabilities.completions is not None
        first = (await ok(client, "neural_cluster_init", {"name": "first"}))["cluster_id"]
        second = (await ok(client, "neural_cluster_init", {"name": "second"}))["cluster_id"]
        evaluate = PromptReference(type="ref/prompt", name="evaluate_and_export")

        async def values(ref, name: str, typed: str, context: dict | None = None) -> list[str]:
            return (await client.complete(ref, {"name": name, "value": typed}, context)).completion.values

        assert await values(evaluate, "cluster_id", "") == [second, first]
        assert await values(evaluate, "cluster_id", first) == [first]
        assert await values(evaluate, "model_id", "dnc") == [second, first]
        assert await values(evaluate, "cluster_id", "nothing-starts-so") == []

        templates = [t["id"] for t in (await ok(client, "neural_list_templates", {"limit": 100}))["templates"]]
        deploy = PromptReference(type="ref/prompt", name="deploy_template")
        assert sorted(await values(deploy, "template_id", "")) == sorted(templates)
        assert await values(deploy, "template_id", "sync") == [t for t in templates if t.startswith("sync")]

        # No node or session exists yet; their arguments (and the session-id aliases) complete to nothing.
        events = ResourceTemplateReference(type="ref/resource", uri="session://{session_id}/events")
        assert await values(events, "session_id", "") == []
        for alias in ("deployment_id", "job_id"):
            assert await values(evaluate, alias, "") == []
        diagnose = PromptReference(type="ref/prompt", name="diagnose_node")
        assert await values(diagnose, "node_id", "", {"cluster_id": first}) == []
        assert await values(evaluate, "nodes", "") == []  # not an id

        synchronous = PromptReference(type="ref/prompt", name="synchronous_training")
        assert await values(synchronous, "dataset", "tweet") == ["tweet-sentiment", "tweet-polarity"]
        federated = PromptReference(type="ref/prompt", name="federated_private_data")
        assert await values(federated, "dataset", "") == []  # a file name of the user's own


def test_completion_is_capped_and_narrowed_by_the_chosen_cluster(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    with store.session() as s:
        for cid in ("dnc_a", "dnc_b"):
            s.add(Cluster(id=cid, name=cid, status="connected", topology="mesh", architecture="mlp",
                          consensus="proof-of-learning", launcher="subprocess", backend="gloo", max_nodes=1,
                          auto_healing=False, token="t", directory=str(tmp_path), created_at=100.0))
        for i in range(MAX_VALUES + 5):
            s.add(TrainingSession(id=f"train_{i:03d}", cluster_id="dnc_a", status="completed", config={},
                                  created_at=1000.0 + i))
    with store.session() as s:  # after the sessions they belong to (no ORM relationship orders the inserts)
        s.add(Checkpoint(id="ckpt_1", session_id="train_000", cluster_id="dnc_a", node_id="node_1", path="x",
                         epoch=1, created_at=5000.0))
        s.add(Checkpoint(id="ckpt_gone", session_id="train_000", cluster_id="dnc_a", node_id="node_1", path="y",
                         epoch=2, created_at=6000.0, deleted=True))
    sessions = complete_ids(store, CompletionArgument(name="job_id", value="train_"), None)
    assert len(sessions.values) == MAX_VALUES and sessions.has_more
    assert sessions.values[0] == f"train_{MAX_VALUES + 4:03d}"  # newest first
    in_b = complete_ids(store, CompletionArgument(name="session_id", value=""),
                        CompletionContext(arguments={"cluster_id": "dnc_b"}))
    assert in_b.values == [] and not in_b.has_more
    models = complete_ids(store, CompletionArgument(name="model_id", value=""), None)
    assert models.values[0] == "ckpt_1" and "ckpt_gone" not in models.values  # a checkpoint newer than the clusters
    store.close()
