"""``logging/setLevel``: the level a client sets becomes the threshold of the package's logger
(what goes to stderr and server.log). The server sends no log notifications to clients (the SDK
deprecates them, SEP-2577), so there is no second threshold to move."""

from __future__ import annotations

import logging

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.types import EmptyResult, LoggingLevel, SetLevelRequestParams

PACKAGE_LOGGER = logging.getLogger("flow_nexus_server")

# MCP's RFC 5424 levels on Python's scale; notice, alert and emergency have no stdlib name.
PYTHON_LEVELS: dict[LoggingLevel, int] = {
    "debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO + 5, "warning": logging.WARNING,
    "error": logging.ERROR, "critical": logging.CRITICAL, "alert": logging.CRITICAL + 10,
    "emergency": logging.CRITICAL + 20,
}


async def set_level(_ctx: ServerRequestContext, params: SetLevelRequestParams) -> EmptyResult:
    PACKAGE_LOGGER.info("a client sets the log level to %s", params.level)
    PACKAGE_LOGGER.setLevel(PYTHON_LEVELS[params.level])
    return EmptyResult()


def register(mcp: MCPServer) -> None:
    # MCPServer has no decorator for this method; the SDK points to the lowlevel server's
    # add_request_handler for spec methods the 2026 revision dropped (served to 2025-era clients).
    mcp._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
