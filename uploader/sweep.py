"""The sweep: abort multipart uploads (and staged parts) under the remote root that no unfinished
manifest row references, and clear a staged backend's leftovers and old capability probes'
uploads (S3: left by a process killed mid-probe).

An upload is started before its id is recorded, so an orphan younger than ``older_than`` is left
alone; the manifest is read again just before each abort.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from uploader.config import DEFAULT_SWEEP_AGE as DEFAULT_SWEEP_AGE
from uploader.crew import Crew
from uploader.errors import UnsupportedOperationError

#: Seconds: a capability probe's upload younger than this is never aborted (a probe takes
#: seconds; another process's may be running even when ``older_than`` is 0).
PROBE_MIN_AGE = 600.0


@dataclass(frozen=True, slots=True)
class SweepReport:
    """Unfinished uploads under the root that no live manifest row references."""

    aborted: tuple[tuple[str, str], ...] = ()  # (key, upload id)
    kept_live: int = 0  # referenced by an unfinished segment
    kept_young: int = 0  # orphaned but younger than ``older_than`` (may be about to be recorded)
    dry_run: bool = False
    tmp_removed: tuple[str, ...] = ()  # leftovers of interrupted assemblies (staged backends)

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "aborted" if not self.dry_run else "would_abort": [
                {"key": k, "upload_id": u} for k, u in self.aborted
            ],
            "kept_live": self.kept_live,
            "kept_young": self.kept_young,
            "tmp_removed": list(self.tmp_removed),
        }


def sweep(
    crew: Crew, *, dry_run: bool = False, older_than: float = DEFAULT_SWEEP_AGE, prefix: str = ""
) -> SweepReport:
    """Abort orphaned multipart uploads (and their staged parts) under the remote root."""
    live = crew.manifest.live_upload_ids()
    now = crew.manifest.clock()
    cutoff = now - timedelta(seconds=older_than)
    aborted: list[tuple[str, str]] = []
    kept_live = kept_young = 0
    try:
        uploads = crew.storage.list_uploads(prefix)
    except UnsupportedOperationError as exc:
        raise UnsupportedOperationError(
            f"sweep: the remote {crew.storage.url} cannot list unfinished multipart uploads "
            f"({exc}); orphaned uploads cannot be found from here: abort them with a lifecycle "
            "rule on the bucket (AbortIncompleteMultipartUpload)",
            op=exc.op,
        ) from exc
    for up in uploads:
        if up.upload_id in live:
            kept_live += 1
            continue
        if up.initiated is not None and up.initiated > cutoff:
            kept_young += 1
            continue
        # Read the manifest again just before aborting: an upload recorded since the listing is
        # live, not an orphan.
        if up.upload_id in crew.manifest.live_upload_ids():
            kept_live += 1
            continue
        if not dry_run:
            crew.storage.abort(up.key, up.upload_id)
        aborted.append((up.key, up.upload_id))
    # A capability probe's own upload (S3, under .uploader/probe/; never in the manifest): its
    # probe aborts it within seconds, so one older than the cutoff (and than PROBE_MIN_AGE,
    # whatever the cutoff) was left by a process killed mid-probe. A younger one may be a
    # running probe's: left alone.
    probe_cutoff = now - timedelta(seconds=max(older_than, PROBE_MIN_AGE))
    probe_uploads = getattr(crew.storage, "probe_uploads", None)
    for up in probe_uploads() if callable(probe_uploads) and not prefix else []:
        if up.initiated is not None and up.initiated > probe_cutoff:
            kept_young += 1
            continue
        if not dry_run:
            crew.storage.abort(up.key, up.upload_id)
        aborted.append((up.key, up.upload_id))
    # Staged backends: temporary files of a complete/put interrupted before publishing.
    clean_tmp = getattr(crew.storage, "clean_tmp", None)
    tmp_removed: list[str] = clean_tmp(older_than, dry_run=dry_run) if clean_tmp else []
    return SweepReport(
        aborted=tuple(aborted),
        kept_live=kept_live,
        kept_young=kept_young,
        dry_run=dry_run,
        tmp_removed=tuple(tmp_removed),
    )
