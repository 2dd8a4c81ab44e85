"""A co-located node yields the CPU to the controller and the front-ends: a status or stop call
then answers in milliseconds while nodes keep every core busy. On an otherwise idle machine
training runs at full speed; lower priority matters only when something else wants the CPU."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

NICE_ENV = "FLOW_NEXUS_NODE_NICE"  # set by the local launchers; absent or 0: normal priority


def lower_cpu_priority(increment: int) -> None:
    """Raise this process's nice value by ``increment`` (0-19). On Linux, a process that starts its
    own session also gets its own scheduling autogroup, where only the group's nice value counts
    against other processes, so that is raised too when the kernel has autogroups."""
    if increment <= 0:
        return
    increment = min(increment, 19)
    try:
        os.nice(increment)
    except (OSError, AttributeError) as exc:  # AttributeError: no os.nice on Windows
        log.warning("could not lower this node's CPU priority: %s", exc)
        return
    _set_autogroup_nice(increment)


def priority_from_environment() -> int:
    try:
        return int(os.environ.get(NICE_ENV, "0"))
    except ValueError:
        return 0


def autogroup_at_own_nice() -> None:
    """Give this process's scheduling autogroup its own nice value. torchrun starts every rank in a
    session of its own, so a rank of a baseline launched at the nodes' priority lands in a new
    autogroup at nice 0 and, on a loaded machine, takes about nine times the CPU share of a niced
    node: a benchmark would then measure the priorities, not the code."""
    _set_autogroup_nice(os.nice(0))


def _set_autogroup_nice(value: int) -> None:
    """The nice value of this process's scheduling autogroup (Linux only; psutil has no call for it)."""
    if sys.platform != "linux":
        return
    try:
        with open("/proc/self/autogroup", "w", encoding="ascii") as group:
            group.write(str(value))
    except OSError:
        pass  # no autogroups (CONFIG_SCHED_AUTOGROUP off): the plain nice value counts
