"""Every way a clip job fails: ``ClipFailed`` and its subclasses, each with a stable code."""

from __future__ import annotations

from typing import ClassVar

from services.common.errors import HermesError


class ClipFailed(HermesError):
    """A job failed; ``code`` says why in a way callers can branch on."""

    status_code = 422
    code = "clip_failed"
    transient: ClassVar[bool] = False


class VideoUnavailable(ClipFailed):
    code = "video_unavailable"


class AgeRestricted(ClipFailed):
    code = "age_restricted"


class MembersOnly(ClipFailed):
    code = "members_only"


class GeoBlocked(ClipFailed):
    code = "geo_blocked"


class LiveNotSupported(ClipFailed):
    code = "live_not_supported"


class SignInRequired(ClipFailed):
    code = "sign_in_required"


class RateLimited(ClipFailed):
    code = "rate_limited"
    transient = True


class SourceUnreachable(ClipFailed):
    code = "source_unreachable"
    transient = True


class UnsupportedSource(ClipFailed):
    code = "unsupported_source"


class RangeOutOfBounds(ClipFailed):
    code = "range_out_of_bounds"


class OutputTooLarge(ClipFailed):
    code = "output_too_large"


class ProcessingFailed(ClipFailed):
    code = "processing_failed"


class DiskLimitExceeded(ClipFailed):
    code = "job_disk_exceeded"


class SourceRefused(ClipFailed):
    code = "source_refused"


class ResultNotStored(ClipFailed):
    code = "storage_unavailable"
    transient = True
