"""Where TorchServe's replicas are: one ``host:port``, a comma list of them, or ``dns:///name:port``,
one name resolving to every replica (a Kubernetes headless Service), re-resolved on every call."""

from __future__ import annotations

import socket
from dataclasses import dataclass

DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class Replica:
    """One TorchServe instance. ``name`` (its management address) labels its metrics."""

    name: str
    inference: str
    management: str
    rest: str = ""  # its REST management API (scaling to 0 workers); "": not configured
    metrics: str = ""  # its metrics API (inference counters); "": not configured


# The optional targets, each a list paired with the replicas or a dns:/// name like the others.
OPTIONAL = ("REFIT_TORCHSERVE_MANAGEMENT_REST", "REFIT_TORCHSERVE_METRICS")


@dataclass(frozen=True)
class Targets:
    """Where TorchServe's replicas are (REFIT_TORCHSERVE_INFERENCE, _MANAGEMENT and, optionally,
    _MANAGEMENT_REST and _METRICS)."""

    inference: tuple[str, ...]
    management: tuple[str, ...]
    dns_name: str = ""  # set: the replicas are every IPv4 address this name resolves to
    rest: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    @classmethod
    def parse(cls, inference: str, management: str, rest: str = "", metrics: str = "") -> Targets:
        """``host:port``, ``h1:p1,h2:p2`` (all lists in the same order) or ``dns:///name:port``
        (all naming the same host, each with its own port)."""
        optional = dict(zip(OPTIONAL, (rest, metrics), strict=True))
        given = [inference, management, *(target for target in optional.values() if target)]
        dns = [target.startswith(DNS_SCHEME) for target in given]
        if any(dns):
            if not all(dns):
                raise ValueError(
                    "REFIT_TORCHSERVE_INFERENCE, _MANAGEMENT (and _MANAGEMENT_REST, _METRICS when "
                    "set) must all be dns:///NAME:PORT or all host:port lists "
                    f"(got {', '.join(map(repr, given))})"
                )
            names = [target.removeprefix(DNS_SCHEME) for target in given]
            hosts = {_split(name)[0] for name in names}
            if len(hosts) != 1:
                raise ValueError(
                    f"dns:/// targets must name the same host (got {', '.join(sorted(hosts))}): "
                    "each resolved address is one TorchServe replica"
                )
            extra = {k: (v.removeprefix(DNS_SCHEME),) if v else () for k, v in optional.items()}
            return cls((names[0],), (names[1],), hosts.pop(), *extra.values())
        lists = [tuple(t.strip() for t in target.split(",")) for target in given]
        if len(lists[0]) != len(lists[1]):
            raise ValueError(
                f"REFIT_TORCHSERVE_INFERENCE lists {len(lists[0])} replicas and "
                f"_MANAGEMENT {len(lists[1])}: give both for every replica, in one order"
            )
        for target in sum(lists, ()):
            _split(target)
        extra = {}
        for name, target in optional.items():
            listed = tuple(t.strip() for t in target.split(",")) if target else ()
            if listed and len(listed) != len(lists[1]):
                raise ValueError(
                    f"{name} lists {len(listed)} replicas and _MANAGEMENT {len(lists[1])}: "
                    "give it for every replica, in the same order"
                )
            extra[name] = listed
        return cls(lists[0], lists[1], "", *extra.values())

    def replicas(self) -> list[Replica]:
        """The replicas now: a DNS name is resolved on every call (replicas come and go)."""
        if not self.dns_name:
            none = ("",) * len(self.management)
            return [
                Replica(m, i, m, r, x)
                for i, m, r, x in zip(
                    self.inference,
                    self.management,
                    self.rest or none,
                    self.metrics or none,
                    strict=True,
                )
            ]
        inference_port, management_port, rest_port, metrics_port = (
            _split(targets[0])[1] if targets else 0
            for targets in (self.inference, self.management, self.rest, self.metrics)
        )

        def at(ip: str, port: int) -> str:
            return f"{ip}:{port}" if port else ""

        return [
            Replica(
                at(ip, management_port),
                at(ip, inference_port),
                at(ip, management_port),
                at(ip, rest_port),
                at(ip, metrics_port),
            )
            for ip in resolve_ipv4(self.dns_name)
        ]


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
