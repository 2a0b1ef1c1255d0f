"""Checking clip requests: YouTube links, time codes, names, limits."""

from __future__ import annotations

import pytest

from services.clip.request import (
    ClipTooLong,
    InvalidRange,
    InvalidTime,
    InvalidUrl,
    build_spec,
    clean_name,
    parse_source,
    parse_time,
    safe_filename,
)
from services.common.errors import InvalidInput

VIDEO = "dQw4w9WgXcQ"
WATCH = f"https://www.youtube.com/watch?v={VIDEO}"


@pytest.mark.parametrize(
    "url",
    [
        f"https://www.youtube.com/watch?v={VIDEO}",
        f"https://youtube.com/watch?v={VIDEO}&t=42s",
        f"http://m.youtube.com/watch?v={VIDEO}&feature=share",
        f"https://music.youtube.com/watch?v={VIDEO}&si=abc",
        f"https://www.youtube.com/watch?v={VIDEO}&list=PL0123456789",
        f"https://www.youtube.com/watch?feature=youtu.be&v={VIDEO}",
        f"https://youtu.be/{VIDEO}",
        f"https://youtu.be/{VIDEO}?si=xyz&t=10",
        f"https://www.youtube.com/shorts/{VIDEO}",
        f"https://www.youtube.com/embed/{VIDEO}?start=3",
        f"https://www.youtube-nocookie.com/embed/{VIDEO}",
        f"https://www.youtube.com/live/{VIDEO}?feature=share",
        f"https://www.youtube.com/v/{VIDEO}",
        f"  https://WWW.YouTube.com/watch?v={VIDEO}  ",
        VIDEO,
    ],
)
def test_youtube_links_are_rebuilt(url: str) -> None:
    source = parse_source(url, frozenset())
    assert source.url == WATCH
    assert source.video_id == VIDEO


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"https://youtube.com.evil.example/watch?v={VIDEO}", "not YouTube"),
        (f"https://evil.example/watch?v={VIDEO}", "not YouTube"),
        (f"https://notyoutube.com/watch?v={VIDEO}", "not YouTube"),
        (f"ftp://www.youtube.com/watch?v={VIDEO}", "http or https"),
        (f"javascript:alert(1)//www.youtube.com/watch?v={VIDEO}", "http or https"),
        (f"file:///etc/passwd?v={VIDEO}", "http or https"),
        (f"https://user:pw@www.youtube.com/watch?v={VIDEO}", "user name"),
        (f"https://www.youtube.com@evil.example/watch?v={VIDEO}", "user name"),
        ("https://www.youtube.com/playlist?list=PL0123456789", "playlist"),
        ("https://www.youtube.com/?list=PL0123456789", "playlist"),
        ("https://www.youtube.com/clip/UgkxAbCdEf", "/clip/"),
        ("https://www.youtube.com/watch?v=short", "11-character"),
        ("https://www.youtube.com/watch", "11-character"),
        ("https://www.youtube.com/@channel", "not point to a YouTube video"),
        (f"https://www.youtube.com:8443/watch?v={VIDEO}", "port"),
        ("not a url", "http or https"),
        ("", "http or https"),
    ],
)
def test_other_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(InvalidUrl, match=reason):
        parse_source(url, frozenset())


def test_extra_hosts_are_admitted_only_when_listed() -> None:
    url = "http://127.0.0.1:8080/video.mp4"
    assert parse_source(url, frozenset({"127.0.0.1:8080"})).url == url
    with pytest.raises(InvalidUrl):
        parse_source(url, frozenset({"127.0.0.1:9090"}))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00:00", 0),
        ("01:02:03", 3723),
        ("1:02:03", 3723),
        ("02:03", 123),
        ("2:03", 123),
        ("1:02.5", 62.5),
        ("00:00:07.250", 7.25),
        ("75", 75),
        ("75.5", 75.5),
        (" 0:05 ", 5),
        ("100:00:00", 360000),
    ],
)
def test_times(text: str, seconds: float) -> None:
    assert parse_time(text, "start_time") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["1:75", "1:60:00", "60:00:00:00", "1:2:3:4", "-5", "abc", "1h", "", ":30", "1::3"]
)
def test_bad_times(text: str) -> None:
    with pytest.raises(InvalidTime):
        parse_time(text, "start_time")


def spec(start: str, end: str, name: str | None = None, max_seconds: float = 60) -> object:
    return build_spec(
        youtube_url=WATCH,
        start_time=start,
        end_time=end,
        name=name,
        extra_hosts=frozenset(),
        max_seconds=max_seconds,
        max_name_length=20,
        max_bytes=1 << 20,
    )


def test_range_rules() -> None:
    with pytest.raises(InvalidRange):
        spec("0:10", "0:10")
    with pytest.raises(InvalidRange):
        spec("0:20", "0:10")
    assert spec("0:10", "1:10")
    with pytest.raises(ClipTooLong, match=r"60\.1 s long; the limit is 60 s"):
        spec("0:10", "1:10.1")


def test_name_is_trimmed_capped_and_made_safe() -> None:
    assert clean_name("  My clip\n\t", 20) == "My clip"
    assert clean_name("   ", 20) is None
    assert clean_name("x" * 20, 20) == "x" * 20
    with pytest.raises(InvalidInput, match="longer than 20"):
        clean_name("x" * 21, 20)
    assert safe_filename("../../x", "mp4") == "x.mp4"
    assert safe_filename("$(rm -rf /)", "mp4") == "rm -rf.mp4"
    assert safe_filename("Café: best bits!", "mp4") == "Cafe_best bits.mp4"
    assert safe_filename("///", "mp4") == "clip.mp4"
