"""Cluster lifecycle, training jobs and the monitor: plain classes that know nothing of MCP."""
