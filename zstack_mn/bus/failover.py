"""A robust AMQP connection over several broker URLs (the members of a RabbitMQ cluster).

aio-pika's ``RobustConnection`` reconnects to the one URL it was given, so a node whose broker
member dies would wait for that member. ``FailoverConnection`` takes the next URL in turn for
every connection attempt, the first one and each reconnect, so the node moves to a live member
within one reconnect interval per dead one.

It relies on one thing aio-pika does: each connection attempt reads ``url`` once
(``Connection.connect``). ``__str__`` is overridden so that logging a connection does not read
it; ``tests/test_broker_failover.py`` checks the behaviour against real brokers.
"""

from __future__ import annotations

from typing import Any

from aio_pika import RobustConnection
from yarl import URL


class FailoverConnection(RobustConnection):
    """A ``RobustConnection`` that tries ``urls`` in turn, starting at ``first``. Connection
    parameters in a URL's query string (heartbeat, ...) are read from ``urls[first]`` only.
    ``update_secret`` (not used here) would move on a URL: it reads ``url`` once more."""

    def __init__(self, urls: list[str], *, first: int = 0, **kwargs: Any) -> None:
        if not urls:
            raise ValueError("at least one broker URL is needed")
        self._urls = [URL(u) for u in urls]
        self._attempt = first
        self._last = first % len(self._urls)
        self._shown = self._urls[self._last]
        super().__init__(url=self._shown, **kwargs)
        self._attempt = first

    @property
    def url(self) -> URL:
        """The URL of the next connection attempt; each read moves on to the following one."""
        self._last = self._attempt % len(self._urls)
        self._attempt += 1
        self._shown = self._urls[self._last]
        return self._shown

    @url.setter
    def url(self, value: URL) -> None:
        self._urls[self._last] = value
        self._shown = value

    @property
    def current_url(self) -> URL:
        """The URL of the latest attempt (for logs and status)."""
        return self._shown

    def __str__(self) -> str:
        shown = self._shown
        return str(shown.with_password("******") if shown.password else shown)
