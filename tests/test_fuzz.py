"""Hypothesis fuzzing of every tool that tools/list publishes, through the in-memory client.

The argument names and types come from each tool's inputSchema (nothing here names a tool
to fuzz). Each example mixes valid-looking values (ids the server returned earlier, values
that fit the schema) with hostile ones: wrong types, huge numbers, NaN, unicode, SQL-ish and
shell-ish strings, path tricks, NUL bytes, very long strings, nested objects, unknown keys.

Every call must end as either a valid result or an `isError` result whose text says what is
wrong: non-empty, no traceback, and not the SDK's bare "Error executing tool X" (what an
unexpected exception inside a tool becomes). Afterwards the server still answers, the SQLite
store is consistent, nothing was written outside the state home, and no node process is left.

Valid-looking strings come from earlier results (ids under the same key as the argument's
name), from the words of the property's description (e.g. the built-in dataset names), or are
hostile strings that still fit the schema's length. To reach deep code paths, a connected
cluster with one live node (and a finished one-epoch training session) is kept ready: its ids
are offered often, and it is re-created when the fuzzing has removed or terminated it.

Cost control (a 2-core machine, < 90 s): the server runs with FLOW_NEXUS_MAX_NODE_PROCESSES=3
(further deploys are refused by the server itself), integers named like `count` are drawn
from at most 2 in the valid-looking branch, booleans named `wait` are never true (a blocking
training run), numbers named like `wait*` / `*timeout*` stay at most 1 second, training runs
the fuzzing starts are stopped before the next tool's turn, and after DEEP_PHASE_S seconds
real ids are no longer offered (calls get cheap). FUZZ_EXAMPLES=150 FUZZ_DEEP_S=400 runs a
longer hunt; FUZZ_LOG=path writes every call and its outcome to a file.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from conftest import pid_alive, shutdown_in_process_ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from sqlalchemy import select

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.store import Cluster, Node, Store, TrainingSession

MIN_TOTAL_CALLS = 560    # spread over every tool listed, at least MIN_PER_TOOL each
MIN_PER_TOOL = 25
# FUZZ_EXAMPLES / FUZZ_DEEP_S raise the effort for a longer hunt (the defaults keep this < 90 s).
EXAMPLES_PER_TOOL = int(os.environ.get("FUZZ_EXAMPLES", "0"))
CALL_TIMEOUT_S = 60      # a call that takes longer than this is a finding (a hang)
DEEP_PHASE_S = float(os.environ.get("FUZZ_DEEP_S", "45"))  # then real ids are no longer offered (cheap calls)


def not_an_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError, OverflowError):
        return True
    return False


# Findings of this fuzz test that the service does not handle yet, as
# (tool, predicate on the arguments, reason). Matching calls are reported, not failed;
# each one also has a strict xfail regression test at the end of this file.
KNOWN_FINDINGS: list[tuple[str, Any, str]] = []  # FUZZ-1 (template max_nodes) is fixed and tested below

HOSTILE_STRINGS = [
    "'; DROP TABLE clusters;--", "\" OR 1=1 --", "1; DELETE FROM nodes", "' UNION SELECT token FROM clusters --",
    "../../etc/passwd", "/etc/passwd", "/etc/shadow", "..", ".", "/", "~", "~root/.ssh/id_rsa", "/proc/self/environ",
    "/dev/zero", "/dev/stdin", "file:///etc/passwd", "..\\..\\windows\\system32", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "data/../../../../canary/secret.txt", "../../canary/secret.txt", "nodes/../../x", "*", "**/*", "/*",
    "\x00", "a\x00b", "dnc_\x00", "node_\x00../x", "%00", "\n\r\t", " ", "", "null", "None", "NaN", "-1", "1e309",
    "${HOME}", "$(touch /tmp/pwned)", "`id`", "-rf", "--help", "|| true", "<script>alert(1)</script>",
    "\u202egnp.exe", "\ud800", "\ufeff", "Ω≈ç√∫˜µ≤≥÷", "💥🔥" * 30, "ｆｕｌｌｗｉｄｔｈ", "ﷺ" * 50,
    "A" * 65, "A" * 256, "A" * 10_000, "A" * 1_100_000,
    "{\"X\": [[1, 2]], \"y\": [0]}", "{\"X\": [], \"y\": []}", "{\"X\": [[1e308]], \"y\": [\"x\"]}", "{",
    "dnc_000000000000", "node_00000000", "sess_00000000", "dnc_" + "f" * 60,
]
HUGE_INTS = [0, -1, 1, 2, 17, 10**6, 2**31, 2**31 - 1, 2**53 + 1, 2**63, -(2**63), 2**64, 10**30, -(10**30)]
ODD_FLOATS = [0.0, -0.0, 1e-300, 1e308, -1e308, math.inf, -math.inf, math.nan, 0.5, 2.5, 1e-5]

known_strings: list[str] = []   # short strings from earlier results (ids above all), fed back as values
known_by_key: dict[str, list[str]] = {}  # the same, by the result key they came under ("cluster_id": [...])
pinned_by_key: dict[str, list[str]] = {}  # ids of the live target cluster, offered often
phase = {"deep": True}  # False once DEEP_PHASE_S has passed: real ids start nodes, which takes seconds


def json_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                     st.sampled_from(HOSTILE_STRINGS[:40]))


def json_values() -> st.SearchStrategy[Any]:
    """Arbitrary JSON, nested a few levels (objects, arrays, anything inside)."""
    return st.recursive(json_scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def known_string(data: st.DataObject, name: str = "") -> str:
    """A string an earlier result carried: preferably under the same key as this argument's name
    (a `cluster_id` argument gets cluster ids), or under any `*_id` key for an id argument."""
    # Draw indexes, not from the (growing) lists themselves: hypothesis wants the same draws each time.
    use_pinned = data.draw(st.integers(0, 2), label="pinned") == 0
    use_any = data.draw(st.integers(0, 4), label="any known string") == 0
    i = data.draw(st.integers(0, 2**20), label="known string")
    if not phase["deep"]:
        return ["dnc_000000000000", "node_00000000", "train_000000000000", "x"][i % 4]
    pinned = list(pinned_by_key.get(name, []))
    if name.endswith("_id"):
        pinned += [v for k, vs in sorted(pinned_by_key.items()) if k != name for v in vs]
    if pinned and use_pinned:
        return pinned[i % len(pinned)]
    pool = known_by_key.get(name, [])
    if not pool and name.endswith("_id"):
        pool = known_by_key.get("id") or [v for k, vs in sorted(known_by_key.items()) if k.endswith("_id") for v in vs]
    pool = pool[-6:]  # the most recent ones: those are the most likely to be alive
    if not pool or use_any:
        pool = known_strings
    return pool[i % len(pool)] if pool else "dnc_000000000000"


def described_words(schema: dict[str, Any]) -> list[str]:
    """Value-like words of a property's description: `digits`, `mnist-5k`, `data/mine.csv`, ..."""
    return sorted({w for w in re.findall(r"[A-Za-z0-9][\w./-]*[A-Za-z0-9]", schema.get("description", ""))
                   if re.search(r"[-_./0-9]", w) or w.islower()})


def fit_string(s: str, schema: dict[str, Any]) -> str:
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if hi is not None:
        s = s[:hi]
    return s + "x" * max(0, lo - len(s))


def looks_like_schema(schema: dict[str, Any], data: st.DataObject, name: str) -> Any:
    """A value of the schema's type and bounds, often a hostile one that still validates."""
    if "enum" in schema:
        return data.draw(st.sampled_from(schema["enum"]))
    if "const" in schema:
        return schema["const"]
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf")
        return looks_like_schema(data.draw(st.sampled_from(options)), data, name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = data.draw(st.sampled_from(kind))
    lname = name.lower()
    if kind == "string":
        words = described_words(schema)
        choice = data.draw(st.sampled_from(["known", "known", "hostile", "text", "known+trick", "described"]))
        if choice == "described" and words:  # e.g. the built-in dataset names a description lists
            s = words[data.draw(st.integers(0, 2**20), label="described word") % len(words)]
        elif choice in ("known", "described"):
            s = known_string(data, name)
        elif choice == "hostile":
            s = data.draw(st.sampled_from(HOSTILE_STRINGS))
        elif choice == "known+trick":
            s = known_string(data, name) + data.draw(st.sampled_from(["/../x", "\x00", " ", "%", "'--", "/", "*"]))
        else:
            s = data.draw(st.text(max_size=80))
        return fit_string(s, schema)
    if kind in ("integer", "number"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if schema.get("exclusiveMinimum") is not None:
            lo = schema["exclusiveMinimum"] + (1 if kind == "integer" else 1e-9)
        if schema.get("exclusiveMaximum") is not None:
            hi = schema["exclusiveMaximum"] - (1 if kind == "integer" else 1e-9)
        if re.search(r"count|workers|replicas", lname):
            hi = min(hi if hi is not None else 2, 2)
        if re.search(r"wait|timeout", lname):
            hi = min(hi if hi is not None else 1, 1)
        if kind == "integer":
            lo_i = math.ceil(lo) if lo is not None else -(2**40)
            hi_i = math.floor(hi) if hi is not None else 2**40
            edge = [v for v in (lo_i, hi_i, lo_i + 1, 0, 1) if lo_i <= v <= hi_i]
            return data.draw(st.one_of(st.sampled_from(edge), st.integers(lo_i, hi_i)))
        lo_f = lo if lo is not None else -1e9
        hi_f = hi if hi is not None else 1e9
        return data.draw(st.one_of(st.sampled_from([lo_f, hi_f]),
                                   st.floats(lo_f, hi_f, allow_nan=False, allow_infinity=False)))
    if kind == "boolean":
        return False if lname == "wait" else data.draw(st.booleans())
    if kind == "null":
        return None
    if kind == "array":
        items = schema.get("items", {})
        n = data.draw(st.integers(schema.get("minItems", 0), min(schema.get("maxItems", 4), 4)))
        return [looks_like_schema(items, data, name) for _ in range(n)]
    if kind == "object":
        props = schema.get("properties")
        if props:
            return {k: looks_like_schema(v, data, k) for k, v in props.items() if data.draw(st.booleans())}
        return data.draw(st.dictionaries(st.sampled_from(["type", "units", "name", "count", "workers", "train",
                                                          "training", "topology", "max_nodes", "../x", "\x00"]),
                                         json_values(), max_size=4))
    return data.draw(json_values())


def hostile_value(data: st.DataObject) -> Any:
    return data.draw(st.one_of(
        st.sampled_from(HOSTILE_STRINGS), st.sampled_from(HUGE_INTS), st.sampled_from(ODD_FLOATS),
        st.integers(), st.floats(), st.booleans(), st.none(), json_values(),
        st.just({"$gt": ""}), st.just([[[[[]]]]]), st.just({"a": {"b": {"c": {"d": {"e": "f"}}}}}),
        st.lists(st.sampled_from(HOSTILE_STRINGS), max_size=5),
    ))


def arguments_for(tool: Any, data: st.DataObject) -> dict[str, Any]:
    schema = tool.input_schema or {}
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    mode = data.draw(st.sampled_from(["valid", "valid", "one_bad", "chaos"]), label="mode")
    args: dict[str, Any] = {}
    for name, prop in props.items():
        if mode == "chaos":
            if data.draw(st.booleans()):
                args[name] = hostile_value(data) if data.draw(st.booleans()) else looks_like_schema(prop, data, name)
        elif name in required or data.draw(st.booleans()):
            args[name] = looks_like_schema(prop, data, name)
    if mode == "one_bad" and props:
        name = data.draw(st.sampled_from(sorted(props)))
        args[name] = hostile_value(data)
    if mode == "chaos" and data.draw(st.booleans()):
        extra = data.draw(st.sampled_from(["__proto__", "constructor", "../x", "\x00", "_meta", "id", "cluster_id",
                                           "A" * 300, "extra"]))
        args[extra] = hostile_value(data)
    if "wait" in props and "wait" in args:
        args["wait"] = False  # no blocking training runs (see the module docstring)
    return args


def harvest(value: Any, key: str = "") -> None:
    """Remember short strings from a result (ids, names) to use as valid-looking values."""
    if isinstance(value, str):
        if 0 < len(value) <= 64 and "\x00" not in value and len(known_strings) < 1000:
            if value not in known_strings:
                known_strings.append(value)
            if key and value not in known_by_key.setdefault(key, []):
                known_by_key[key].append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            harvest(v, str(k))
    elif isinstance(value, list):
        for v in value[:50]:
            harvest(v, key)


def problem_with(tool: str, result: Any) -> str | None:
    """Why this result is not acceptable, or None."""
    texts = [getattr(c, "text", "") for c in result.content or []]
    text = "\n".join(t for t in texts if t)
    if result.is_error:
        if not text.strip():
            return "isError with an empty message"
        if "Traceback" in text or 'File "' in text:
            return f"isError with a traceback: {text[:300]!r}"
        if re.fullmatch(rf"Error executing tool {re.escape(tool)}:?\s*", text.strip()):
            return f"an unexpected exception inside the tool (the SDK's bare {text.strip()!r})"
        return None
    if "Traceback" in text:
        return f"a result carrying a traceback: {text[:300]!r}"
    return None


def known_finding(tool: str, args: dict[str, Any]) -> str | None:
    for name, matches, reason in KNOWN_FINDINGS:
        if name == tool and matches(args):
            return reason
    return None


def short(args: dict[str, Any]) -> str:
    return repr({k: (v[:60] + f"...<{len(v)} chars>" if isinstance(v, str) and len(v) > 60 else v)
                 for k, v in args.items()})[:600]


@pytest.fixture
def fuzz_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FLOW_NEXUS_MAX_NODE_PROCESSES", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("FLOW_NEXUS_DB_URL", raising=False)
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret.txt").write_text("canary")
    yield tmp_path / "home"
    shutdown_in_process_ray()  # the fuzzer's launcher 'ray' calls start Ray inside this process


def test_fuzz_every_tool(fuzz_home: Path, tmp_path: Path) -> None:
    cfg = Settings.from_env(fuzz_home)
    known_strings.clear()
    known_by_key.clear()
    pinned_by_key.clear()
    phase["deep"] = True
    calls: list[str] = []
    findings: list[str] = []
    known: list[str] = []
    outcomes: dict[str, dict[str, int]] = {}
    refreshes: list[str] = []
    outside_before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(fuzz_home)}
    pwned = Path("/tmp/pwned")  # what "$(touch /tmp/pwned)" would create if it reached a shell
    pwned_before = pwned.exists()

    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        server = build_server(cfg)
        with portal.wrap_async_context_manager(Client(server, read_timeout_seconds=CALL_TIMEOUT_S)) as client:

            async def call(name: str, args: dict[str, Any]) -> Any:
                with anyio.fail_after(CALL_TIMEOUT_S):
                    return await client.call_tool(name, args)

            def ok(name: str, args: dict[str, Any]) -> dict[str, Any]:
                result = portal.call(call, name, args)
                assert not result.is_error, f"{name}: {result.content[0].text}"
                harvest(result.structured_content)
                return result.structured_content

            tools = portal.call(client.list_tools).tools
            assert tools, "tools/list is empty"

            # Some real state to aim at: an empty cluster, a terminated one, and (before each tool's
            # turn, see ensure_target) a connected cluster with one live node. Setting up uses the
            # lifecycle tools; the fuzzing below uses whatever tools/list says.
            ok("neural_cluster_init", {"name": "fuzz-empty"})
            gone = ok("neural_cluster_init", {"name": "fuzz-gone"})["cluster_id"]
            ok("neural_cluster_terminate", {"cluster_id": gone})
            target: dict[str, str] = {}
            peek = Store(cfg.db_url)  # a second reader of the same SQLite file, to look without calling tools

            def ensure_target() -> None:
                """A connected cluster with a live node, so valid-looking calls reach deep paths.
                Training runs the fuzzing started are stopped first: they would eat the CPU."""
                with peek.session() as s:
                    running = list(s.scalars(select(TrainingSession.id).where(TrainingSession.status == "running")))
                for sid in running:
                    portal.call(call, "neural_training_stop", {"session_id": sid})
                if (target and peek.nodes(target["cluster_id"])
                        and peek.cluster(target["cluster_id"]).status == "connected"):
                    return
                with peek.session() as s:
                    active = list(s.scalars(select(Cluster.id).where(Cluster.status != "terminated")))
                for cid in active:  # make room under FLOW_NEXUS_MAX_NODE_PROCESSES and _MAX_CLUSTERS
                    portal.call(call, "neural_cluster_terminate", {"cluster_id": cid})
                target["cluster_id"] = ok("neural_cluster_init", {"name": "fuzz-live", "max_nodes": 3})["cluster_id"]
                node = ok("neural_node_deploy", {"cluster_id": target["cluster_id"], "count": 1})["nodes"][0]
                ok("neural_cluster_connect", {"cluster_id": target["cluster_id"]})
                pinned_by_key.update(cluster_id=[target["cluster_id"]], node_id=[node["node_id"]])
                refreshes.append(target["cluster_id"])

            ensure_target()
            # One short real training session, so the tools that take a session id have one to chew on.
            train = portal.call(call, "neural_train_distributed",
                                {"cluster_id": target["cluster_id"], "dataset": "digits", "epochs": 1})
            if not train.is_error:
                harvest(train.structured_content)
                sid = train.structured_content["session_id"]
                pinned_by_key["session_id"] = [sid]
                for _ in range(60):  # let it finish, so the target's node holds a trained model
                    status = portal.call(call, "neural_training_status", {"session_id": sid})
                    if status.is_error or status.structured_content.get("status") != "running":
                        break
                    time.sleep(0.5)
            for t in tools:  # harvest what the read-only, argument-free calls return (template ids, ...)
                if not (t.input_schema or {}).get("required") and t.annotations and t.annotations.read_only_hint:
                    result = portal.call(call, t.name, {})
                    if not result.is_error:
                        harvest(result.structured_content)

            per_tool = EXAMPLES_PER_TOOL or max(MIN_PER_TOOL, math.ceil(MIN_TOTAL_CALLS / len(tools)))

            def fuzzer(tool: Any) -> Any:
                @settings(max_examples=per_tool, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(data=st.data())
                def fuzz_one(data: st.DataObject) -> None:
                    phase["deep"] = phase["deep"] and time.monotonic() < deep_until
                    args = arguments_for(tool, data)
                    started = time.monotonic()
                    try:
                        result = portal.call(call, tool.name, args)
                    except Exception as exc:  # noqa: BLE001 - a protocol error or a hang is a finding
                        problem = f"raised {type(exc).__name__}: {str(exc)[:300]}"
                    else:
                        problem = problem_with(tool.name, result)
                        if not result.is_error:
                            harvest(result.structured_content)
                    calls.append(tool.name)
                    outcome = "raised" if problem and problem.startswith("raised") else (
                        "error" if result.is_error else "ok")
                    outcomes.setdefault(tool.name, {}).setdefault(outcome, 0)
                    outcomes[tool.name][outcome] += 1
                    if os.environ.get("FUZZ_LOG"):
                        with open(os.environ["FUZZ_LOG"], "a") as f:
                            said = getattr(result.content[0], 'text', '<image>') if outcome != 'raised' else problem
                            f.write(f"{tool.name} {short(args)}\n   -> {time.monotonic() - started:.2f}s {outcome}: "
                                    f"{said[:200]!r}\n")
                    if problem:
                        line = f"{tool.name}({short(args)}) -> {problem}"
                        reason = known_finding(tool.name, args)
                        (known if reason else findings).append(line + (f"  [known: {reason}]" if reason else ""))

                return fuzz_one

            deep_until = time.monotonic() + DEEP_PHASE_S
            for tool in tools:
                phase["deep"] = time.monotonic() < deep_until
                if phase["deep"]:
                    ensure_target()
                fuzzer(tool)()
            peek.close()

            # The server still answers, and every cluster the fuzzing created can be terminated.
            listed = ok("neural_cluster_list", {"include_terminated": True})
            for c in listed["clusters"]:
                if c["status"] != "terminated":
                    term = portal.call(call, "neural_cluster_terminate", {"cluster_id": c["cluster_id"]})
                    assert not term.is_error, f"terminating {c['cluster_id']}: {term.content[0].text}"
            assert ok("neural_cluster_list", {"include_terminated": False})["count"] == 0

    # The client is closed and the server's lifespan has stopped everything. Check the store.
    store = Store(cfg.db_url)
    try:
        with store.session() as s:
            clusters = {c.id: c for c in s.scalars(select(Cluster))}
            nodes = list(s.scalars(select(Node)))
            sessions = list(s.scalars(select(TrainingSession)))
        assert clusters, "no cluster at all: the setup did not run"
        for c in clusters.values():
            assert Path(c.directory).is_dir(), f"cluster {c.id} has no directory {c.directory!r}"
            assert Path(c.directory).resolve().is_relative_to(cfg.clusters_dir), f"cluster {c.id} lives outside"
        for n in nodes:
            assert n.cluster_id in clusters, f"node {n.id} belongs to a missing cluster {n.cluster_id!r}"
        for t in sessions:
            assert t.cluster_id in clusters, f"training session {t.id} belongs to a missing cluster"
        leftover = [n.pid for n in nodes if n.pid and pid_alive(n.pid)]
    finally:
        store.close()
    for pid in leftover:  # do not leave them behind even when the assertion below fails
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not leftover, f"node processes still running after the test: {leftover}"

    # Nothing was written outside the state home (path tricks stayed inside).
    outside_after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(fuzz_home)}
    assert outside_after == outside_before, sorted(map(str, outside_after - outside_before))
    assert (tmp_path / "canary" / "secret.txt").read_text() == "canary"
    assert pwned_before or not pwned.exists(), "a string argument reached a shell"

    counts = {t.name: calls.count(t.name) for t in tools}
    assert len(calls) >= MIN_TOTAL_CALLS, counts
    assert all(n >= per_tool for n in counts.values()), counts
    print(f"{len(refreshes)} target cluster(s); deep phase ended: {not phase['deep']}; {len(calls)} fuzzed calls: "
          + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    if known:
        print(f"{len(known)} call(s) hit known findings:\n" + "\n".join(known[:20]))
    assert not findings, f"{len(findings)} finding(s) in {len(calls)} calls:\n" + "\n".join(findings[:40])


@pytest.mark.anyio
@pytest.mark.parametrize("max_nodes", ["x", [1], "3", 0, True, 2.7])
async def test_deploy_template_with_a_max_nodes_that_is_not_an_integer(home: Path, max_nodes: Any) -> None:
    async with Client(build_server(Settings.from_env(home))) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        if "neural_deploy_template" not in tools:
            pytest.skip("no neural_deploy_template tool")
        listed = await client.call_tool("neural_list_templates", {})
        template_id = listed.structured_content["templates"][0]["id"]
        result = await client.call_tool("neural_deploy_template",
                                        {"template_id": template_id, "custom_config": {"max_nodes": max_nodes}})
        assert result.is_error
        text = result.content[0].text
        assert "max_nodes" in text, f"the message does not say what is wrong: {text!r}"
        assert (await client.call_tool("neural_cluster_list", {})).structured_content["count"] == 0
