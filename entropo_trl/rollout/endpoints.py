"""Several OpenAI-compatible endpoints behind one [`ChatClient`]: the order in which a request tries them, and which
of them are out of rotation.

A request with a session id (the rollout runner passes the episode id) tries the endpoints in their rendezvous
(highest-random-weight) order for that id: each endpoint's weight is a stable hash of `"{endpoint}|{session_id}"`,
highest first. So every turn of an episode goes to the same server, whose prefix cache holds the conversation so
far; sessions spread evenly over the endpoints; and an endpoint that goes away moves only its own sessions, each to
the next endpoint in its own order, while the other sessions stay where they are. A request without a session id
takes the endpoints round robin.

An endpoint that failed a request after the client's retries (no connection, timeouts, HTTP 5xx) is out of rotation
for `backoff` seconds; each further outage doubles that, up to `max_backoff`, and an answer resets it. Endpoints out
of rotation come last in every order: a request tries them only when every endpoint in rotation has failed it, so a
short outage of all of them does not fail every request for the whole back-off. Failures of one outage seen by
several requests in flight count once.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["EndpointPool", "parse_endpoints", "rendezvous_order"]

logger = logging.getLogger(__name__)


def parse_endpoints(base_url: str | Sequence[str]) -> tuple[str, ...]:
    """The API roots named by `base_url`: one URL, a comma-separated list of them (`"http://a/v1,http://b/v1"`, as
    `--base_url` takes them), or a sequence; each without its trailing `/`."""
    urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    endpoints = tuple(url.strip().rstrip("/") for url in urls)
    if not endpoints or not all(endpoints):
        raise ValueError(f"base_url must name one endpoint or several, comma-separated; got {base_url!r}")
    duplicates = sorted({url for url in endpoints if endpoints.count(url) > 1})
    if duplicates:
        raise ValueError(f"base_url names an endpoint more than once: {', '.join(duplicates)}")
    return endpoints


def _weight(endpoint: str, session_id: str) -> int:
    # blake2b, not `hash`: the same order in every process and on every run (Python salts `hash` of a str)
    return int.from_bytes(hashlib.blake2b(f"{endpoint}|{session_id}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(endpoints: Sequence[str], session_id: str) -> list[str]:
    """`endpoints` by their rendezvous weight for `session_id`, highest first: the first is the session's endpoint,
    the next the one it moves to when the first is down, and so on."""
    return sorted(endpoints, key=lambda endpoint: (_weight(endpoint, session_id), endpoint), reverse=True)


@dataclass
class _Health:
    failures: int = 0  # outages in a row, reset by an answer
    down_until: float = 0.0  # out of rotation until this time (the pool's clock)


class EndpointPool:
    """The endpoints of one client, the order a request tries them in ([`order`]), and their health ([`failed`],
    [`succeeded`]).

    Args:
        endpoints: the API roots, as [`parse_endpoints`] gives them.
        backoff: seconds an endpoint stays out of rotation after its first outage.
        max_backoff: the longest time out of rotation, however many outages in a row.
        clock: the time in seconds (`time.monotonic`; tests may pass their own).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        backoff: float = 30.0,
        max_backoff: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not backoff > 0 or max_backoff < backoff:
            raise ValueError(f"need 0 < endpoint_backoff <= endpoint_max_backoff; got {backoff} and {max_backoff}")
        self.endpoints = tuple(endpoints)
        self.backoff, self.max_backoff, self.clock = backoff, max_backoff, clock
        self.health = {endpoint: _Health() for endpoint in self.endpoints}
        self._next = itertools.count()

    def in_rotation(self, endpoint: str) -> bool:
        """Whether `endpoint` is past its back-off (or never failed)."""
        return self.clock() >= self.health[endpoint].down_until

    def order(self, session_id: str | None) -> list[str]:
        """The endpoints in the order a request tries them: those in rotation, then those out of it; each group in
        the session's rendezvous order, or round robin without a session id."""
        if session_id is not None:
            ranked = rendezvous_order(self.endpoints, session_id)
        else:
            start = next(self._next) % len(self.endpoints)
            ranked = [*self.endpoints[start:], *self.endpoints[:start]]
        up = [endpoint for endpoint in ranked if self.in_rotation(endpoint)]
        return up + [endpoint for endpoint in ranked if endpoint not in up]

    def failed(self, endpoint: str) -> None:
        """Take `endpoint` out of rotation after a request failed there for good; a failure while it is already out
        (another request of the same outage, or a last try) does not lengthen its back-off."""
        if not self.in_rotation(endpoint):
            return
        health = self.health[endpoint]
        health.failures += 1
        seconds = min(self.backoff * 2 ** (health.failures - 1), self.max_backoff)
        health.down_until = self.clock() + seconds
        if len(self.endpoints) > 1:  # with one endpoint there is nowhere to move: the error says it all
            logger.warning(
                f"endpoint {endpoint} failed a request after the client's retries: out of rotation for {seconds:g} s"
            )

    def succeeded(self, endpoint: str) -> None:
        """Put `endpoint` back in rotation with its back-off reset: it answered."""
        health = self.health[endpoint]
        if health.failures:
            logger.info(f"endpoint {endpoint} answered again: back in rotation")
        health.failures, health.down_until = 0, 0.0
