"""Who we talk to: peers we send results to (DICOM or DICOMweb, and how the link is secured), callers we accept."""

from __future__ import annotations

import ipaddress
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx

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
    hosts: tuple[str, ...] = ()  # resolved when an association arrives

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


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class WebAuth:
    """How we authenticate to a DICOMweb peer: HTTP basic (user, password) or a bearer token (secret only)."""

    scheme: str  # "basic" or "bearer"
    user: str = ""
    secret: str = field(default="", repr=False)

    @classmethod
    def parse(cls, text: str) -> WebAuth:
        """'basic USER:PASSWORD' or 'bearer TOKEN' (the secret never appears in an error)."""
        scheme, _, rest = text.strip().partition(" ")
        scheme, rest = scheme.lower(), rest.strip()
        if scheme == "bearer" and rest:
            return cls("bearer", secret=rest)
        user, colon, password = rest.partition(":")
        if scheme == "basic" and user and colon and password:
            return cls("basic", user, password)
        raise ValueError("expected 'basic USER:PASSWORD' or 'bearer TOKEN'")


@dataclass(frozen=True, slots=True)
class WebPeer:
    """A DICOMweb server we send results to by STOW-RS; its name stands where an AE title does (destination,
    profiles), and it needs no DICOM association."""

    ae_title: str  # the peer's name
    url: str  # the DICOMweb service root; STOW-RS posts to {url}/studies
    auth: WebAuth | None = field(default=None, repr=False)
    ca: Path | None = None  # CA bundle that signs the server's certificate (None: the system's)

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    def client(self, timeout_s: float) -> httpx.Client:
        """httpx with this peer's basic or bearer credentials and CA bundle (STOW-RS sending, the peer check)."""
        auth = httpx.BasicAuth(self.auth.user, self.auth.secret) if self.auth and self.auth.scheme == "basic" else None
        headers = {"Accept": "application/dicom+json"}
        if self.auth is not None and self.auth.scheme == "bearer":
            headers["Authorization"] = f"Bearer {self.auth.secret}"
        verify = ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
        return httpx.Client(auth=auth, headers=headers, verify=verify, timeout=timeout_s, follow_redirects=False)

    @classmethod
    def parse(cls, text: str) -> WebPeer:
        """Parse 'NAME=http(s)://host[:port]/path'."""
        name, equals, url = text.strip().partition("=")
        check_ae_title(name.strip())
        parts = urllib.parse.urlsplit(url.strip())
        if not equals or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"'{text.strip()}' is not NAME=http(s)://host[:port]/path")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"the URL of {name.strip()} may hold no credentials, query or fragment")
        return cls(name.strip(), url.strip().rstrip("/"))


def parse_web_peers(text: str) -> tuple[WebPeer, ...]:
    return tuple(WebPeer.parse(item) for item in text.split(",") if item.strip())


def parse_web_credentials(text: str) -> dict[str, WebAuth]:
    """One line per peer: 'NAME basic USER:PASSWORD' or 'NAME bearer TOKEN' (blank lines and # comments skipped)."""
    found: dict[str, WebAuth] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.strip().partition(" ")
        try:
            found[check_ae_title(name)] = WebAuth.parse(rest)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return found


def with_credentials(
    peers: tuple[WebPeer, ...], credentials: dict[str, WebAuth], ca: Path | None
) -> tuple[WebPeer, ...]:
    """Give each web peer its credentials and the CA bundle; credentials never go in clear text off this host."""
    names = {peer.ae_title for peer in peers}
    if strangers := sorted(set(credentials) - names):
        raise ValueError(f"credentials for {strangers}, which are not DICOMweb peers")
    for peer in peers:
        if peer.ae_title in credentials and not peer.tls and peer.host not in _LOOPBACK_NAMES:
            raise ValueError(f"{peer.ae_title}: credentials are sent only over https (or to this host)")
    return tuple(WebPeer(p.ae_title, p.url, credentials.get(p.ae_title), ca) for p in peers)
