"""What a recovery worker (and a store's upkeep) works with: ``store.crew``."""

from __future__ import annotations

from dataclasses import dataclass

from uploader.driver import Driver
from uploader.leases import LeaseKeeper
from uploader.manifest.repo import Manifest
from uploader.storage.base import Storage


@dataclass(frozen=True, slots=True)
class Crew:
    """What a recovery worker works with (a store provides it: ``store.crew``)."""

    manifest: Manifest
    storage: Storage
    driver: Driver
    keeper: LeaseKeeper
    worker: str
    node: str
    lease_seconds: float
    concurrency: int
