"""Where TorchServe's replicas are: one ``host:port``, a comma list of them, or ``dns:///name:port``,
one name resolving to every replica (a Kubernetes headless Service), re-resolved on every call."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class Replica:
    """One TorchServe instance. ``name`` (its management address) labels its metrics."""

    name: str
    inference: str
    management: str
    rest: str = ""  # its REST management API (scaling to 0 workers); "": not configured


@dataclass(frozen=True)
class Targets:
    """Where TorchServe's replicas are (REFIT_TORCHSERVE_INFERENCE, _MANAGEMENT and, optionally,
    _MANAGEMENT_REST)."""

    inference: tuple[str, ...]
    management: tuple[str, ...]
    dns_name: str = ""  # set: the replicas are every IPv4 address this name resolves to
    rest: tuple[str, ...] = ()

    @classmethod
    def parse(cls, inference: str, management: str, rest: str = "") -> Targets:
        """``host:port``, ``h1:p1,h2:p2`` (all lists in the same order) or ``dns:///name:port``
        (all naming the same host, each with its own port)."""
        given = [inference, management] + ([rest] if rest else [])
        dns = [target.startswith(DNS_SCHEME) for target in given]
        if any(dns):
            if not all(dns):
                raise ValueError(
                    "REFIT_TORCHSERVE_INFERENCE and _MANAGEMENT (and _MANAGEMENT_REST when set) "
                    "must both be dns:///NAME:PORT or all host:port lists "
                    f"(got {', '.join(map(repr, given))})"
                )
            names = [target.removeprefix(DNS_SCHEME) for target in given]
            hosts = {_split(name)[0] for name in names}
            if len(hosts) != 1:
                raise ValueError(
                    f"dns:/// targets must name the same host (got {', '.join(sorted(hosts))}): "
                    "each resolved address is one TorchServe replica"
                )
            return cls((names[0],), (names[1],), hosts.pop(), tuple(names[2:]))
        lists = [tuple(t.strip() for t in target.split(",")) for target in given]
        if len(lists[0]) != len(lists[1]):
            raise ValueError(
                f"REFIT_TORCHSERVE_INFERENCE lists {len(lists[0])} replicas and "
                f"_MANAGEMENT {len(lists[1])}: give both for every replica, in one order"
            )
        if rest and len(lists[2]) != len(lists[0]):
            raise ValueError(
                f"REFIT_TORCHSERVE_MANAGEMENT_REST lists {len(lists[2])} replicas and "
                f"_MANAGEMENT {len(lists[1])}: give it for every replica, in the same order"
            )
        for target in sum(lists, ()):
            _split(target)
        return cls(lists[0], lists[1], rest=lists[2] if rest else ())

    def replicas(self) -> list[Replica]:
        """The replicas now: a DNS name is resolved on every call (replicas come and go)."""
        if not self.dns_name:
            rest = self.rest or ("",) * len(self.management)
            return [
                Replica(m, i, m, r)
                for i, m, r in zip(self.inference, self.management, rest, strict=True)
            ]
        _, inference_port = _split(self.inference[0])
        _, management_port = _split(self.management[0])
        rest_port = _split(self.rest[0])[1] if self.rest else 0
        return [
            Replica(
                f"{ip}:{management_port}",
                f"{ip}:{inference_port}",
                f"{ip}:{management_port}",
                f"{ip}:{rest_port}" if rest_port else "",
            )
            for ip in resolve_ipv4(self.dns_name)
        ]

    def initial_inference_target(self) -> str:
        """Before the reconciler names the replicas in rotation: all of them."""
        if self.dns_name:
            return DNS_SCHEME + self.inference[0]  # gRPC resolves and re-resolves it
        return balanced_target(self.inference)


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"TorchServe target {target!r} is not HOST:PORT")
    return host, int(port)


def resolve_ipv4(host: str) -> list[str]:
    """The host's IPv4 addresses, sorted; none when the name does not resolve (yet)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({info[4][0] for info in infos})


def balanced_target(addresses: Sequence[str]) -> str:
    """A gRPC target spreading calls over ``addresses``: one stays as given (gRPC resolves it);
    several become an ``ipv4:`` address list, which is what round_robin balances over."""
    if len(addresses) == 1:
        return addresses[0]
    resolved = []
    for address in addresses:
        host, port = _split(address)
        resolved += [f"{ip}:{port}" for ip in resolve_ipv4(host)[:1]]
    return "ipv4:" + ",".join(resolved) if resolved else addresses[0]
