"""Two real network hosts on one machine: network namespaces joined by a link, for multi-node tests.

``TwoHosts()`` (root only) makes, and removes on exit whatever happened:

1. A private /24 that no route of this machine uses (random ``10.x.y.0/24``); host i gets
   ``.{i+1}``.
2. Two network namespaces ``mdt-<pid>-<n>-h0/h1``, each with loopback up, its own
   ``/etc/hosts`` naming both hosts and a ``resolv.conf`` without a reachable DNS server
   (``ip netns exec`` mounts ``/etc/netns/NS/*`` over ``/etc``): a cluster's name service.
3. The link: a veth pair (default), or, with ``delay_ms``/``loss``, two TAP devices and a user
   space relay that delays and drops the frames host 1 sends, as ``tc ... netem`` on host 1's
   interface would (``link_relay.py``: these kernels lack sch_netem). Both ends carry the same
   interface name (``ifname``) in their host, as ``eth0`` does on a cluster.
4. Commands run in a host through ``ip netns exec NS unshare --uts``, with the host's own
   hostname (``node0``/``node1``): a process sees its host's addresses, routes and name, so
   same-host shortcuts (the shared-memory EP transport) are off between the two.

Every process started here carries ``MDT_TWO_HOSTS=<namespace prefix>`` in its environment;
``close()`` SIGKILLs every process in both namespaces, deletes them, the hosts files and the
relay, and raises if anything is left. ``leftovers()`` lists what any session left behind
(namespaces, ``/etc/netns`` folders, root-namespace links, marked processes); the session
fixture ``no_leftovers`` fails the suite on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

PREFIX = "mdt-"  # namespaces and root-namespace links made by this module
MARK = "MDT_TWO_HOSTS"  # environment variable on every process started in a host
NETNS_ETC = Path("/etc/netns")
RELAY = Path(__file__).with_name("link_relay.py")
CLONE_NEWNET = 0x40000000
_counter = itertools.count()
T = TypeVar("T")


def require_root() -> None:
    """Fail (never skip) the test where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.fail(
            "multi-host tests need root: they create network namespaces and veth links "
            "(ip netns add); CI runs them as root"
        )
    missing = [b for b in ("ip", "unshare") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"multi-host tests need {missing} (Debian iproute2, util-linux): run `make setup-system`")


def _ip(*args: str) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no route or address of the root namespace."""
    used = []
    for line in (_ip("-4", "route", "show", "table", "all") + _ip("-4", "-o", "addr")).splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                if "." in word:
                    used.append(ipaddress.ip_network(word, strict=False))
    rng = random.Random(os.urandom(8))
    for _ in range(1000):
        net = ipaddress.ip_network(f"10.{rng.randrange(64, 255)}.{rng.randrange(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 found")


@dataclass(frozen=True)
class Host:
    index: int
    netns: str
    hostname: str
    addr: str
    ifname: str


class TwoHosts:
    def __init__(self, ifname: str = "mdnet0", delay_ms: float = 0.0, loss: float = 0.0) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.subnet = free_subnet()
        self.ifname, self.delay_ms, self.loss = ifname, delay_ms, loss
        self.relayed = bool(delay_ms or loss)
        addrs = list(self.subnet.hosts())[:2]
        self.hosts = [Host(i, f"{self.prefix}-h{i}", f"node{i}", str(addrs[i]), ifname) for i in range(2)]
        self.procs: list[subprocess.Popen] = []
        self.relay: subprocess.Popen | None = None

    # ------------------------------------------------------------------ set up / tear down

    def __enter__(self) -> TwoHosts:
        require_root()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        h0, h1 = self.hosts
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            etc = NETNS_ETC / h.netns
            etc.mkdir(parents=True, exist_ok=True)
            names = "".join(f"{x.addr} {x.hostname}\n" for x in self.hosts)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
            (etc / "hostname").write_text(h.hostname + "\n")
            # No DNS server is reachable from the hosts: the resolver must fail at once, not
            # after its timeouts (a name is in hosts, an address without one has no name).
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        tmp = [f"mdt{os.getpid() % 100000}{next(_counter)}{s}" for s in "ab"]
        if self.relayed:
            self.relay = subprocess.Popen(
                [sys.executable, str(RELAY), *tmp, str(self.delay_ms), str(self.loss), "7"],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, MARK: self.prefix},
            )
            if self.relay.stdout is None or self.relay.stdout.readline().strip() != "ready":
                raise RuntimeError("link relay did not start (needs /dev/net/tun)")
            for name, h in zip(tmp, self.hosts, strict=True):
                _ip("link", "set", name, "netns", h.netns)
        else:
            _ip("link", "add", tmp[0], "netns", h0.netns, "type", "veth", "peer", tmp[1], "netns", h1.netns)
        for name, h in zip(tmp, self.hosts, strict=True):
            _ip("-n", h.netns, "link", "set", name, "name", h.ifname)
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/{self.subnet.prefixlen}", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill every process in both hosts, delete them, their files and the link; raise if
        anything could not be removed."""
        for h in self.hosts:
            self.kill_host(h.index)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        if self.relay is not None:
            self.relay.kill()
            self.relay.wait()
            if self.relay.stdout:
                self.relay.stdout.close()
        for h in self.hosts:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "delete", h.netns)
            shutil.rmtree(NETNS_ETC / h.netns, ignore_errors=True)
        left = [x for x in leftovers() if self.prefix in x]
        if left:
            raise RuntimeError(f"two hosts {self.prefix}: left behind {left}")

    # ------------------------------------------------------------------ running things

    def cmd(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` as run inside host ``host`` (its network namespace and hostname)."""
        h = self.hosts[host]
        script = 'hostname "$1" && shift && exec "$@"'
        return [
            "ip",
            "netns",
            "exec",
            h.netns,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            h.hostname,
            *argv,
        ]

    def popen(self, host: int, argv: list[str], log: Path | None = None, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in ``host``; stdout and stderr go to ``log`` (or are captured)."""
        env = {**(kw.pop("env", None) or os.environ), MARK: self.prefix}
        if log is not None:
            with open(log, "w") as out:
                p = subprocess.Popen(
                    self.cmd(host, argv), stdout=out, stderr=subprocess.STDOUT, env=env, **kw
                )
        else:
            p = subprocess.Popen(
                self.cmd(host, argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                **kw,
            )
        self.procs.append(p)
        return p

    def run(self, host: int, argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        env = {**(kw.pop("env", None) or os.environ), MARK: self.prefix}
        return subprocess.run(
            self.cmd(host, argv), capture_output=True, text=True, timeout=timeout, env=env, **kw
        )

    def pids(self, host: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.hosts[host].netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host: int, timeout_s: float = 10) -> int:
        """SIGKILL every process in ``host`` (a node that dies) until none is left; how many."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while pids := self.pids(host):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} survive SIGKILL in {self.hosts[host].netns}")
            time.sleep(0.05)
        for p in self.procs:  # reap ours, so that none lingers as a zombie
            if p.pid in killed:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        return len(killed)

    def set_link(self, host: int, up: bool) -> None:
        """Cut (``up=False``) or restore host ``host``'s end of the link."""
        h = self.hosts[host]
        _ip("-n", h.netns, "link", "set", h.ifname, "up" if up else "down")

    def call_in(self, host: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread that joined ``host``'s network namespace (sockets it opens
        live there); only that thread moves, the test process stays where it is."""
        result: dict[str, Any] = {}

        def body() -> None:
            try:
                fd = os.open(f"/var/run/netns/{self.hosts[host].netns}", os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns into the host's network namespace")
                finally:
                    os.close(fd)
                result["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                result["error"] = exc

        t = threading.Thread(target=body)
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def rsh_agent(self, path: Path) -> Path:
        """An ssh stand-in for OpenMPI (``plm_rsh_agent``): ``AGENT HOST COMMAND...`` runs the
        command line in that host, as ``ssh HOST COMMAND...`` runs it in the remote shell."""
        cases = "".join(f"  {h.addr}|{h.hostname}) ns={h.netns}; name={h.hostname} ;;\n" for h in self.hosts)
        path.write_text(
            "#!/bin/sh\n"
            "# ssh stand-in: run the command line on a test host (its network namespace)\n"
            'host=$1; shift\ncase "$host" in\n'
            + cases
            + '  *) echo "rsh agent: unknown host $host" >&2; exit 255 ;;\nesac\n'
            'exec ip netns exec "$ns" unshare --uts -- sh -c \'hostname "$1"; shift; exec sh -c "$*"\' '
            'sh "$name" "$@"\n'
        )
        path.chmod(0o755)
        return path


def _marked_processes() -> list[tuple[int, str]]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for var in (proc / "environ").read_bytes().split(b"\0"):
                if var.startswith(f"{MARK}=".encode()):
                    out.append((int(proc.name), var.decode().split("=", 1)[1]))
    return out


def _ours_or_dead(name: str) -> bool:
    """Was ``mdt-<pid>-...`` made by this process or by one that no longer runs?"""
    pid = name[len(PREFIX) :].split("-", 1)[0]
    if not pid.isdigit():
        return False
    return int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists()


def leftovers() -> list[str]:
    """What this session (or a dead one) left behind: namespaces, hosts files, links, processes."""
    out = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and _ours_or_dead(name):
            out.append(f"namespace {name}")
    if NETNS_ETC.is_dir():
        out += [f"{p}" for p in NETNS_ETC.iterdir() if p.name.startswith(PREFIX) and _ours_or_dead(p.name)]
    for line in _ip("-o", "link").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"mdt{os.getpid() % 100000}"):
            out.append(f"link {name}")
    out += [f"process {pid} ({tag})" for pid, tag in _marked_processes() if _ours_or_dead(tag)]
    return out


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    with TwoHosts() as hosts:
        yield hosts


@pytest.fixture(scope="session")
def no_leftovers() -> Iterator[None]:
    """After the whole session: no namespace, veth, hosts file or process of these tests remains."""
    require_root()
    yield
    left = leftovers()
    assert not left, f"multi-host tests left behind: {left}"
