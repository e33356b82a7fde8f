"""Hosts for the multi-host rehearsal: network namespaces on one bridge, made and removed by the test.

    root namespace ── bridge <tag>br 10.213.S.254/24
                        ├── veth ── namespace aigis<tag>-1   10.213.S.1
                        ├── veth ── namespace aigis<tag>-2   10.213.S.2
                        └── ...

Each namespace has its own loopback and ports (every replica listens on 50051, as pods do), and an
/etc/hosts of its own (`ip netns exec` bind-mounts /etc/netns/<name>/hosts), which stands in for
cluster DNS. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    probe = f"aigisprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` is not permitted here: {exc.stderr.decode(errors='replace').strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Hosts:
    """`count` namespaces (hosts 1..count) on one bridge; `address(i)` is host i's address."""

    count: int
    tag: str = field(default_factory=lambda: str(os.getpid() % 10_000))
    subnet: int = field(default_factory=lambda: 100 + os.getpid() % 150)
    made: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"a{self.tag}br"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (where the test itself connects from)."""
        return f"10.213.{self.subnet}.254"

    def name(self, i: int) -> str:
        return f"aigis{self.tag}-{i}"

    def address(self, i: int) -> str:
        return f"10.213.{self.subnet}.{i}"

    def create(self, hosts_entries: dict[str, int]) -> None:
        """Make the bridge and the namespaces; `hosts_entries` maps a DNS name to a host number."""
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append("bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{self.address(i)} {name}\n" for name, i in hosts_entries.items()
        )
        for i in range(1, self.count + 1):
            ns, veth, peer = self.name(i), f"a{self.tag}v{i}", f"a{self.tag}p{i}"
            _ip("netns", "add", ns)
            self.made.append(ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", peer)
            _ip("-n", ns, "link", "set", peer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Delete everything made (namespaces take their veth pairs with them); never raises."""
        for item in reversed(self.made):
            try:
                if item == "bridge":
                    _ip("link", "del", self.bridge)
                else:
                    _ip("netns", "del", item)
                    shutil.rmtree(NETNS_ETC / item, ignore_errors=True)
            except subprocess.CalledProcessError:
                pass
        self.made.clear()
