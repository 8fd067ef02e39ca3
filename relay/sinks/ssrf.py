"""Which addresses a webhook may reach: the SSRF guard's policy.

A webhook URL comes from configuration, but what its host name resolves to can change at any
time (DNS rebinding). The webhook sink therefore checks every address it is about to connect
to, after resolution, with :func:`blocked_reason`; the literal-IP case is also refused when
the configuration is loaded. A route opts out with ``allow_private_network = true``.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Cloud instance metadata services (AWS, GCP, Azure, OpenStack; Alibaba; AWS over IPv6).
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254")
)


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why a webhook must not connect to ``address``, or None when it is a public address.

    Refused: loopback, private (RFC 1918, ULA), link-local (and with it the 169.254.169.254
    metadata service), carrier-grade NAT, multicast, unspecified, reserved and documentation
    ranges: everything Python does not call *global*, including IPv4 addresses embedded in
    IPv4-mapped and NAT64 IPv6 addresses.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return blocked_reason(ip.ipv4_mapped)
        if ip in _NAT64:
            return blocked_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.scope_id:
            return "link-local"
    if ip in _METADATA:
        return "cloud metadata service"
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "not a public address"
    return None


def literal_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one (``[::1]`` brackets allowed), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
