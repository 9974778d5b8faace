"""What a recovery pass reports: one :class:`SegmentOutcome` per claim, the pass's
:class:`RecoveryReport` (totals, and its JSON form for ``uploader recover --json``)."""

from __future__ import annotations

from dataclasses import dataclass

from uploader.states import SegmentState


@dataclass(frozen=True, slots=True)
class SegmentOutcome:
    """What one claim of one segment did."""

    key: str
    before: str  # state when claimed
    after: str  # state when released
    bytes_sent: int = 0
    bytes_reused: int = 0
    detail: str = ""
    lost: bool = False  # another worker took the segment over: this pass decided nothing


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What a recovery pass did. ``ok`` is what the CLI's exit code says."""

    outcomes: tuple[SegmentOutcome, ...] = ()
    bytes_sent: int = 0
    bytes_reused: int = 0
    parts_sent: int = 0
    parts_reused: int = 0

    @property
    def resumed(self) -> int:
        """Segments this pass claimed and worked on."""
        return len(self.outcomes)

    @property
    def verified(self) -> tuple[str, ...]:
        return tuple(
            o.key for o in self.outcomes if o.after == SegmentState.VERIFIED.value and not o.lost
        )

    @property
    def failed(self) -> tuple[tuple[str, str], ...]:
        """(key, reason) of segments this pass declared failed."""
        return tuple(
            (o.key, o.detail)
            for o in self.outcomes
            if o.after == SegmentState.FAILED.value and not o.lost
        )

    @property
    def unfinished(self) -> tuple[tuple[str, str], ...]:
        """(key, why) of sealed segments left unverified (retryable errors); a later pass retries."""
        return tuple(
            (o.key, o.detail)
            for o in self.outcomes
            if o.after in (SegmentState.SEALED.value, SegmentState.UPLOADED.value) and not o.lost
        )

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unfinished

    def as_dict(self) -> dict[str, object]:
        return {
            "resumed": self.resumed,
            "verified": list(self.verified),
            "failed": [{"key": k, "reason": r} for k, r in self.failed],
            "unfinished": [{"key": k, "error": r} for k, r in self.unfinished],
            "bytes_sent": self.bytes_sent,
            "bytes_reused": self.bytes_reused,
            "parts_sent": self.parts_sent,
            "parts_reused": self.parts_reused,
            "segments": [
                {
                    "key": o.key,
                    "before": o.before,
                    "after": o.after,
                    "bytes_sent": o.bytes_sent,
                    "bytes_reused": o.bytes_reused,
                    "detail": o.detail,
                    "lost": o.lost,
                }
                for o in self.outcomes
            ],
        }
