"""Who we talk to: peers we send results to (and how the link is secured), callers we accept and from where."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e](?:[\x20-\x5b\x5d-\x7e]{0,15})$")  # PS3.5 AE: no backslash/control


@dataclass(frozen=True, slots=True)
class PeerTls:
    """How a link to a peer is secured: trusted CAs (None: the system's) and our client certificate (mutual TLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class Peer:
    """A DICOM peer we send results to: AE title, host, port, and TLS when marked `+tls`."""

    ae_title: str
    host: str
    port: int
    tls: PeerTls | None = None

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse 'AET@host:port' or 'AET@host:port+tls'."""
        match = re.fullmatch(r"\s*([^@]+)@([^:@\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})(\+tls)?\s*", text)
        if not match:
            raise ValueError(f"'{text}' is not AET@host:port or AET@host:port+tls")
        ae_title, host, port = match.group(1).strip(), match.group(2).strip("[]"), int(match.group(3))
        check_ae_title(ae_title)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        return cls(ae_title=ae_title, host=host, port=port, tls=PeerTls() if match.group(4) else None)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


@dataclass(frozen=True, slots=True)
class Caller:
    """A calling AE title and where it may connect from: IP networks and host names (neither: any address)."""

    ae_title: str
    networks: tuple[Network, ...] = ()
    hosts: tuple[str, ...] = ()          # resolved when an association arrives

    @property
    def from_anywhere(self) -> bool:
        return not self.networks and not self.hosts

    @classmethod
    def parse(cls, text: str) -> Caller:
        """Parse 'AET' (any address) or 'AET@SOURCE[|SOURCE...]', a source being an IP, a CIDR or a host name."""
        ae_title, at, sources = text.strip().partition("@")
        check_ae_title(ae_title.strip())
        if at and not sources.strip():
            raise ValueError(f"'{text.strip()}' names no source after '@'")
        networks: list[Network] = []
        hosts: list[str] = []
        for source in (item.strip() for item in sources.split("|") if at):
            try:
                networks.append(ipaddress.ip_network(source.strip("[]"), strict=False))
            except ValueError:
                if not _HOST_NAME.match(source):
                    raise ValueError(f"'{source}' is not an IP address, a CIDR network or a host name") from None
                hosts.append(source.lower())
        return cls(ae_title.strip(), tuple(networks), tuple(hosts))

    @classmethod
    def of_peer(cls, peer: Peer) -> Caller:
        """A peer may call us from the address of its own host (what PACSAI_PEERS alone allows)."""
        return cls.parse(f"{peer.ae_title}@{peer.host}")


def check_ae_title(ae_title: str) -> str:
    if not _AE_TITLE.match(ae_title) or ae_title != ae_title.strip():
        raise ValueError(f"'{ae_title}' is not a valid AE title (1-16 printable characters, no backslash)")
    return ae_title


def parse_callers(text: str) -> tuple[Caller, ...]:
    """'AET[@SOURCE|SOURCE],...': one rule per AE title (its sources merged when it is listed twice)."""
    merged: dict[str, Caller] = {}
    for caller in (Caller.parse(item) for item in text.split(",") if item.strip()):
        known = merged.get(caller.ae_title)
        if known is not None and (known.from_anywhere or caller.from_anywhere):
            caller = Caller(caller.ae_title)
        elif known is not None:
            caller = Caller(caller.ae_title, known.networks + caller.networks, known.hosts + caller.hosts)
        merged[caller.ae_title] = caller
    return tuple(merged.values())
