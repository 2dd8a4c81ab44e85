"""flow-nexus-server: an MCP server that runs real distributed PyTorch training."""

__version__ = "0.1.0"
