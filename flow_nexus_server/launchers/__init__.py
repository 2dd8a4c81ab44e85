"""Launchers start node agents: local subprocesses today; docker and ray share the interface."""

from flow_nexus_server.launchers.base import LaunchError, NodeHandle, NodeLauncher, NodeSpec
from flow_nexus_server.launchers.local import SubprocessLauncher

__all__ = ["LaunchError", "NodeHandle", "NodeLauncher", "NodeSpec", "SubprocessLauncher"]
