"""Whether an upload may start now, checked before its body is read: the client's rate limit
(`CLIPSCOPE_UPLOAD_RATE_LIMIT`), its share of the live worker's slots (`CLIPSCOPE_UPLOAD_SLOTS_PER_CLIENT`)
and a free slot (`CLIPSCOPE_LIVE_QUEUE_SIZE`). Refusals are `UploadRejected` with `Retry-After`.

A client is its address (the peer's, or the one a trusted proxy names in
`X-Forwarded-For`); an IPv6 client is its /64 network, which one host
commonly holds whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from starlette.requests import Request

from clipscope_explorer.app.live.batcher import Busy, ClientBusy, MicroBatcher, Slot
from clipscope_explorer.app.live.input import UploadRejected


def client_key(request: Request) -> str:
    """Whom the per-client limits count."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def check_rate(request: Request) -> None:
    """429 when this client has used up its uploads for now."""
    limiter = request.app.state.upload_limiter
    if limiter is None:
        return
    wait = limiter.acquire(client_key(request))
    if wait:
        per_minute = request.app.state.settings.upload_rate_limit
        raise UploadRejected(
            429,
            f"too many uploads from your address (at most {per_minute} a minute); try again in {wait} s",
            {"Retry-After": str(wait)},
        )


@contextmanager
def upload_slot(request: Request, batcher: MicroBatcher) -> Iterator[Slot]:
    """Hold one of the live worker's slots for the block: 429 when this client holds its share already, 503
    when all are taken."""
    share = request.app.state.settings.upload_slots_per_client
    with ExitStack() as held:
        try:
            slot = held.enter_context(batcher.admit(client_key(request), share))
        except ClientBusy as busy:
            raise UploadRejected(
                429,
                f"your address already has {busy.share} uploads in progress (the most at "
                "once); try again when one is done",
                {"Retry-After": str(busy.retry_after)},
            ) from None
        except Busy as busy:
            raise UploadRejected(
                503, "busy encoding other uploads; try again shortly", {"Retry-After": str(busy.retry_after)}
            ) from None
        yield slot
