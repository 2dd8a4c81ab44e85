"""The MCP tools, one module per area; each module's ``register(mcp, app)`` declares its tools."""
