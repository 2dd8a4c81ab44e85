"""A scripted MCP client over streamable HTTP: plain httpx and JSON-RPC, no MCP SDK.

Start a server first, e.g.:

    FLOW_NEXUS_TOKEN=s3cret flow-nexus-server --transport http --port 8765

then run:

    python examples/http_client.py --url http://127.0.0.1:8765/mcp --token=s3cret

(write --token=VALUE with '=': a random token may begin with '-', which argparse would
otherwise read as an option).

It runs initialize (protocol 2025-11-25) -> notifications/initialized -> tools/list ->
tools/call neural_cluster_init (with a progress token) -> tools/call neural_cluster_list, and
prints each result. Every request carries the bearer token and, after initialize, the
Mcp-Session-Id header the server assigned. A POST may be answered with plain JSON or with an
SSE stream (text/event-stream) that carries progress notifications before the response.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

PROTOCOL_VERSION = "2025-11-25"


class McpHttpError(RuntimeError):
    pass


class McpHttpClient:
    def __init__(self, url: str, token: str | None, timeout: float = 120.0) -> None:
        self.url = url
        self.http = httpx.Client(timeout=timeout)
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.session_id: str | None = None
        self.next_id = 0

    def close(self) -> None:
        if self.session_id:  # end the session on the server
            try:
                self.http.delete(self.url, headers=self._headers())
            except httpx.HTTPError:
                pass
        self.http.close()

    def _headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = PROTOCOL_VERSION
        return headers

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        reply = self.http.post(self.url, json=msg, headers=self._headers())
        if reply.status_code not in (200, 202):
            raise McpHttpError(f"{method}: HTTP {reply.status_code}: {reply.text}")

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return its JSON-RPC result (progress notifications are printed)."""
        self.next_id += 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        with self.http.stream("POST", self.url, json=msg, headers=self._headers()) as reply:
            if reply.status_code != 200:
                reply.read()
                raise McpHttpError(f"{method}: HTTP {reply.status_code}: {reply.text}")
            if "mcp-session-id" in reply.headers:
                self.session_id = reply.headers["mcp-session-id"]
            ctype = reply.headers.get("content-type", "")
            if ctype.startswith("text/event-stream"):
                answer = self._from_sse(reply)
            elif ctype.startswith("application/json"):
                reply.read()
                answer = self._match(reply.json())
            else:
                reply.read()
                raise McpHttpError(f"{method}: unexpected content type {ctype!r}: {reply.text[:200]}")
        if answer is None:
            raise McpHttpError(f"{method}: the server sent no response for request {self.next_id}")
        if "error" in answer:
            raise McpHttpError(f"{method}: JSON-RPC error {answer['error']}")
        return answer["result"]

    def _from_sse(self, reply: httpx.Response) -> dict[str, Any] | None:
        """Read SSE events until the response to our request arrives."""
        data: list[str] = []
        for line in reply.iter_lines():
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and data:  # end of one event
                payload, data = "\n".join(data), []
                answer = self._match(json.loads(payload))
                if answer is not None:
                    return answer
        return self._match(json.loads("\n".join(data))) if data else None

    def _match(self, payload: Any) -> dict[str, Any] | None:
        """Our response out of one message or a batch; server notifications are shown."""
        for msg in payload if isinstance(payload, list) else [payload]:
            if msg.get("id") == self.next_id and ("result" in msg or "error" in msg):
                return msg
            if msg.get("method") == "notifications/progress":
                p = msg.get("params", {})
                total = f"/{p['total']}" if p.get("total") is not None else ""
                print(f"  progress {p.get('progress')}{total} {p.get('message') or ''}".rstrip())
        return None

    def call_tool(self, name: str, arguments: dict[str, Any], progress_token: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"name": name, "arguments": arguments}
        if progress_token is not None:
            params["_meta"] = {"progressToken": progress_token}
        result = self.request("tools/call", params)
        if result.get("isError"):
            text = " ".join(c.get("text", "") for c in result.get("content", []))
            raise McpHttpError(f"{name} failed: {text}")
        return result.get("structuredContent") or json.loads(result["content"][0]["text"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8765/mcp", help="the server's MCP endpoint")
    ap.add_argument("--token", default=os.environ.get("FLOW_NEXUS_TOKEN"),
                    help="bearer token, written --token=VALUE (default: $FLOW_NEXUS_TOKEN)")
    ap.add_argument("--name", default="http-example", help="name of the cluster to create")
    args = ap.parse_args(argv)

    client = McpHttpClient(args.url, args.token)
    try:
        init = client.request("initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "flow-nexus-http-example", "version": "1.0"},
        })
        server = init["serverInfo"]
        print(f"initialized: {server['name']} {server.get('version', '')} "
              f"protocol {init['protocolVersion']} session {client.session_id}")
        client.notify("notifications/initialized")

        tools = client.request("tools/list")["tools"]
        print(f"tools ({len(tools)}): {', '.join(t['name'] for t in tools)}")

        created = client.call_tool("neural_cluster_init", {"name": args.name, "topology": "ring"},
                                   progress_token="init-1")
        print(f"created cluster {created['cluster_id']} ({created['name']}, {created['topology']}, "
              f"status {created['status']})")

        listed = client.call_tool("neural_cluster_list", {})
        print(f"clusters ({listed['count']}):")
        for c in listed["clusters"]:
            print(f"  {c['cluster_id']} {c['name']} {c['status']} topology={c['topology']} nodes={c['nodes']}")
    except (McpHttpError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
