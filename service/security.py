"""How the serving port is secured: TLS material, who may call, which RPCs are open.

No PyTorch here (the serving path).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from service.calls import Authenticator


@dataclass(frozen=True)
class ServerSecurity:
    """The serving port's transport and access control.

    ``credentials`` None is plaintext; ``authenticator`` None lets every caller in unidentified.
    Either is insecure and must be asked for explicitly (``ecgx serve --insecure``).
    ``open_rpcs``: full method names, or service prefixes ending in "/", served without
    credentials (health and reflection for probes).
    """

    credentials: grpc.ServerCredentials | None
    authenticator: Authenticator | None
    open_rpcs: tuple[str, ...] = ()

    @property
    def insecure(self) -> bool:
        return self.credentials is None or self.authenticator is None

    @classmethod
    def plaintext_unauthenticated(cls) -> ServerSecurity:
        """No TLS and no authentication: for a trusted loopback only (tests, the demo)."""
        return cls(credentials=None, authenticator=None)

    def describe(self) -> str:
        """One line for the start-up log."""
        transport = "PLAINTEXT (no TLS)" if self.credentials is None else "TLS"
        access = "NO AUTHENTICATION" if self.authenticator is None else "authenticated callers only"
        return f"{transport}, {access}"

    def start(self) -> None:
        """Start following credential files (token reloads); nothing to do without them."""

    def stop(self) -> None:
        """Stop following credential files."""
