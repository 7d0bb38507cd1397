"""Who is calling: ``authorization: Bearer <key>`` metadata to a tenant name."""

from __future__ import annotations

from collections.abc import Iterable

from trainer.errors import NotFound, Unauthenticated
from trainer.names import check_name
from trainer.tenants import TenantRegistry

ACT_AS_HEADER = "x-tenant"


class Authenticator:
    def __init__(self, registry: TenantRegistry) -> None:
        self.registry = registry

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant a call acts for; an admin key may name another with ``x-tenant``."""
        md = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        header = md.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("missing 'authorization: Bearer <key>' metadata")
        tenant = self.registry.authenticate(key.strip())
        if tenant is None:
            raise Unauthenticated("the API key is not valid")
        act_as = md.get(ACT_AS_HEADER)
        if act_as is None or act_as == tenant.name:
            return tenant.name
        if not tenant.admin:
            # Answered like an unknown tenant: a tenant key learns nothing about others.
            raise NotFound(f"tenant {act_as!r} not found")
        check_name(act_as, ACT_AS_HEADER)
        if self.registry.get(act_as) is None:
            raise NotFound(f"tenant {act_as!r} not found")
        return act_as
