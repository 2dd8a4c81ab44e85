"""Simulated hosts: Linux network namespaces on a bridge, each with its own address and Ray node.

Every name this creates starts with ``fnx17`` and a random tag (namespaces, the bridge, veth
pairs, Ray's temp directory), the subnet is a random ``10.217.X.0/24``, and ``down()`` removes
all of it, killing every process that runs inside the namespaces (Ray's daemons, the server, its
controller and the node actors). ``ray stop`` is not used: it would stop every Ray process on the
machine, including other users' clusters; the processes are found by namespace instead
(``ip netns pids``). The namespaces have no route out: traffic stays between them.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RAY_PORT = 6379  # each namespace has its own ports: the default cannot clash with another cluster
RAY_NODE_CPUS = 2
START_ATTEMPTS = 3
OBJECT_STORE_BYTES = 80 * 2**20  # Ray's minimum is 75 MiB; the default (30% of RAM per node) is far more


class CannotSimulate(RuntimeError):
    """Namespaces cannot be made here (no root, no `ip`, or the kernel refuses)."""


@dataclass
class Host:
    name: str  # "a", "b", ...
    netns: str
    ifname: str  # the interface inside the namespace (GLOO_SOCKET_IFNAME)
    outer: str  # its peer on the bridge
    address: str


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise CannotSimulate(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


class SimulatedHosts:
    def __init__(self, count: int = 3) -> None:
        self.cut: set[str] = set()  # hosts a test took away; restore() brings them back
        self.token = secrets.token_hex(32)
        self.tag = "fnx17" + secrets.token_hex(2)
        self.subnet = f"10.217.{random.randint(16, 250)}"
        self.bridge = f"{self.tag}br"
        self.hosts = [Host(name, f"{self.tag}-{name}", f"{self.tag}{name}1", f"{self.tag}{name}0",
                           f"{self.subnet}.{i + 1}") for i, name in enumerate("abc"[:count])]
        self.temp_dir = Path(f"/tmp/{self.tag}")  # short: Ray's unix socket paths must stay < 108 chars
        self.ray = str(Path(sys.executable).with_name("ray"))

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def ray_address(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    # ----------------------------------------------------------------------------- network
    def up(self) -> None:
        """Bridge, namespaces, veth pairs, addresses. CannotSimulate when the machine refuses."""
        if os.geteuid() != 0:
            raise CannotSimulate(f"network namespaces need root (this runs as uid {os.geteuid()})")
        if shutil.which("ip") is None:
            raise CannotSimulate("the `ip` command (iproute2) is not installed")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            _ip("link", "add", h.outer, "type", "veth", "peer", "name", h.ifname)
            _ip("link", "set", h.ifname, "netns", h.netns)
            _ip("link", "set", h.outer, "master", self.bridge)
            _ip("link", "set", h.outer, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            # No gateway: the route only gives Ray's own address detection (a UDP connect towards
            # a public address) this interface's address; nothing leaves the bridge.
            _ip("-n", h.netns, "route", "add", "default", "dev", h.ifname)
            self._etc(h)
        self.temp_dir.mkdir(mode=0o700)

    def _etc(self, host: Host) -> None:
        """The host's own /etc/hosts and resolv.conf (`ip netns exec` mounts /etc/netns/NAME/*).

        The machine's DNS server is out of reach from the bridge, and a reverse lookup that waits
        5 s for it made torch's TCPStore time out its first connection; here a lookup fails at
        once (nothing answers on 127.0.0.1:53), and every host knows the others by name."""
        etc = Path("/etc/netns") / host.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        names = "".join(f"{h.address} {self.tag}-{h.name}\n" for h in self.hosts)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}")

    def set_link(self, host: Host, up: bool) -> None:
        """Cut (or restore) a host's only cable: its end of the veth pair on the bridge."""
        _ip("link", "set", host.outer, "up" if up else "down")
        if not up:
            self.cut.add(host.name)

    def power_off(self, host: Host) -> None:
        """The host loses power: every process in it dies at once (its Ray node included)."""
        self.cut.add(host.name)
        self.kill_processes(host)

    def restore(self) -> None:
        """Bring every cut host back as a fresh Ray node: link up, old processes gone, `ray start`."""
        hosts = [h for h in self.hosts if h.name in self.cut]
        if not hosts:
            return
        for h in hosts:
            self.set_link(h, up=True)
            self.kill_processes(h)
        self.start_ray(*hosts)
        self.wait_alive(hosts)
        self.cut.clear()

    def down(self) -> None:
        """Kill everything inside the namespaces, then remove them, the veths and the bridge."""
        for h in self.hosts:
            self.kill_processes(h)
        for h in self.hosts:
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", h.outer], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / h.netns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ----------------------------------------------------------------------------- processes
    def command(self, host: Host, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", host.netns, *argv]

    def pids(self, host: Host) -> list[int]:
        proc = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=30)
        return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    def kill_processes(self, host: Host, timeout: float = 10.0) -> None:
        """SIGKILL every process in the host's namespace (a host that loses power), until none is left."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids(host)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def ray_env(self, host: Host) -> dict[str, str]:
        """The environment of `ray start` on a host; the node actors inherit it from the raylet."""
        return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
                "GLOO_SOCKET_IFNAME": host.ifname, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                **self.ray_auth}

    @property
    def ray_auth(self) -> dict[str, str]:
        """Ray's token authentication, on for every process of this cluster (docs/multi-host.md,
        section 1) with a token of its own: left to itself, `ray start --head` turns it on only
        when ~/.ray/auth_token exists, which another Ray user of this machine may have made."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start_ray(self, *hosts: Host) -> None:
        """`ray start` on these hosts, one after the other (side by side, on a busy 2-core machine,
        a raylet missed Ray's start-up deadline); a host whose start fails is cleared and tried again
        (the head before any other: a retried head is a new cluster)."""
        for host in hosts:
            for attempt in range(START_ATTEMPTS):
                try:
                    self._ray_start(host)
                    break
                except RuntimeError:  # Ray gives a raylet 30 s to register, which a loaded machine can miss
                    if attempt == START_ATTEMPTS - 1:
                        raise
                    self.kill_processes(host)
                    if host is self.head:
                        shutil.rmtree(self.temp_dir, ignore_errors=True)
                        self.temp_dir.mkdir(mode=0o700)

    def _ray_start(self, host: Host) -> None:
        argv = [self.ray, "start", "--node-ip-address", host.address, "--num-cpus", str(RAY_NODE_CPUS),
                "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
        if host is self.head:
            argv += ["--head", "--port", str(RAY_PORT), "--include-dashboard=false",
                     "--temp-dir", str(self.temp_dir)]
        else:
            argv += ["--address", self.ray_address]
        proc = subprocess.run(self.command(host, *argv), env=self.ray_env(host), capture_output=True, text=True,
                              timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start on host {host.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")

    def alive_ray_nodes(self) -> set[str]:
        """Addresses of the Ray nodes the head counts as alive (asked from inside the head's namespace)."""
        code = (f"import ray, json; ray.init(address={self.ray_address!r}, log_to_driver=False, "
                "configure_logging=False); "
                "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        proc = subprocess.run(self.command(self.head, sys.executable, "-c", code), env=self.ray_env(self.head),
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"asking Ray for its nodes failed: {proc.stderr[-2000:]}")
        import json

        return set(json.loads(proc.stdout.strip().splitlines()[-1]))

    def start_cluster(self) -> None:
        self.start_ray(*self.hosts)
        self.wait_alive(self.hosts)

    def wait_alive(self, hosts: list[Host]) -> None:
        want = {h.address for h in hosts}
        deadline = time.monotonic() + 120
        while not want <= (alive := self.alive_ray_nodes()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray nodes alive: {sorted(alive)}, expected {sorted(want)}")
            time.sleep(1)
