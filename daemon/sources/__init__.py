"""What apilogd drains and where a forwarder publishes: the spool, Redis, RabbitMQ, or any other Celery broker.

One module per kind of backend behind `base.Source` and `base.Publisher`; the kind is chosen
here, from APILOG_BROKER_URL's scheme, and nowhere else. Broker clients are imported only by a
daemon that uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apilog.core.shards import broker_kind
from apilog.settings import Settings

from ..state.folders import Folders
from ..state.ledger import Ledger
from .base import Publisher, Source
from .spool import SpoolSource


def open_source(settings: Settings, folders: Folders) -> Callable[[Ledger], Source[Any]]:
    """The source a writer of files drains: the embedded spool (roles local), or its shards of the broker (role write)."""
    if settings.drains_spool:
        return lambda ledger: SpoolSource(settings, folders, ledger)
    kind = broker_kind(settings.broker_url)
    if kind == "redis":
        from .broker import writer_id
        from .redis import RedisSource

        return lambda ledger: RedisSource(settings, folders, ledger, writer_id(folders.state))
    if kind == "rabbitmq":
        from .rabbitmq import AmqpSource

        return lambda ledger: AmqpSource(settings, folders, ledger)
    from .kombu import BrokerSource

    return lambda ledger: BrokerSource(settings, folders, ledger)


def open_publisher(settings: Settings) -> Publisher:
    """Where a forwarder publishes: APILOG_BROKER_URL's kind of broker."""
    kind = broker_kind(settings.broker_url)
    if kind == "redis":
        from .redis import RedisPublisher

        return RedisPublisher(settings)
    if kind == "rabbitmq":
        from .rabbitmq import AmqpPublisher

        return AmqpPublisher(settings)
    from .kombu import KombuPublisher

    return KombuPublisher(settings)
