"""Hardening: schemathesis over both OpenAPI specs in-process, hypothesis properties of the
request parsers and of the address guard, and hostile bytes through the compress upload route.

Every failure is collected (not only the first) and reported with the input that caused it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlencode

import httpx
import pillow_heif
import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.clip.app import create_app as create_clip_app
from services.clip.request import (
    TIMECODE,
    YOUTUBE_HOSTS,
    InvalidTime,
    InvalidUrl,
    SourceUrl,
    parse_source,
    parse_time,
)
from services.clip.settings import ClipSettings
from services.common.http import is_refused_address
from services.compress.app import create_app as create_compress_app
from services.compress.settings import CompressSettings
from tests.support.apps import client
from tests.support.images import samples

pillow_heif.register_heif_opener()

# No example database: nothing is saved between runs, every run draws afresh.
QUICK = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------------------------------------
# 1. schemathesis against both apps, in-process over ASGI (the lifespan runs: schemathesis starts
#    it on the first request and `asgi.shutdown_lifespans()` ends it).
# ---------------------------------------------------------------------------------------------

AnyCase: TypeAlias = schemathesis.Case[Any]
MIN_CASES = 500
# What the budget aims at; hypothesis may find a strategy exhausted before it.
TARGET_CASES = 1000
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
WATCH = "https://www.youtube.com/watch?v="


@dataclass
class FuzzReport:
    """What one schemathesis run sent and found."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)
    unsendable: Counter[str] = field(default_factory=Counter)
    accepted_jobs: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def summary(self, name: str, seconds: float) -> str:
        lines = [f"{name}: {self.total} cases in {seconds:.1f} s"]
        lines += [f"  {label}: {count}" for label, count in sorted(self.cases.items())]
        lines.append(
            "  statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items()))
        )
        if self.unsendable:
            lines.append(f"  not sendable by the client (skipped): {dict(self.unsendable)}")
        return "\n".join(lines)

    def failure_text(self) -> str:
        return "\n\n".join(f"== {key}\n{text}" for key, text in self.failures.items())


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def _has_inputs(operation: Any) -> bool:
    definition: dict[str, Any] = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def _check(report: FuzzReport, case: AnyCase, mode: str) -> None:
    label = case.operation.label
    report.cases[f"{label} [{mode}]"] += 1
    try:
        response = case.call()
    except (requests.exceptions.InvalidHeader, UnicodeEncodeError) as exc:
        # The test client cannot put some generated header values on the wire at all.
        report.unsendable[type(exc).__name__] += 1
        return
    report.statuses[f"{label} {response.status_code}"] += 1
    if response.status_code == 202 and label.startswith("POST /download"):
        report.accepted_jobs.append(str(response.json()["job_id"]))
    if response.status_code == 200 and label == "GET /jobs/{job_id}":
        report.statuses[f"job {response.json().get('status')}"] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        for failure in group.exceptions:
            key = f"{label}: {failure.title} (HTTP {response.status_code})"
            report.failures.setdefault(key, str(group))


def _runner(
    report: FuzzReport,
    strategy: st.SearchStrategy[AnyCase],
    mode: str,
    max_examples: int,
) -> Callable[[], None]:
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: AnyCase) -> None:
        _check(report, case, mode)

    return run


def fuzz(app: FastAPI, *, target: int = TARGET_CASES) -> FuzzReport:
    """Positive (with the spec's examples) and negative cases for every operation."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = _operations(schema)
    with_inputs = [op for op in operations if _has_inputs(op)]
    # Two modes per operation with inputs.
    budget = math.ceil(target / (2 * len(with_inputs)))
    report = FuzzReport()
    for operation in operations:
        examples = operation.get_strategies_from_examples()
        modes: list[tuple[str, st.SearchStrategy[AnyCase]]] = [
            ("positive", st.one_of(operation.as_strategy(), *examples)),
        ]
        if _has_inputs(operation):
            modes.append(
                ("negative", operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
            )
        for mode, strategy in modes:
            examples_count = budget if _has_inputs(operation) else 5
            _runner(report, strategy, mode, examples_count)()
    return report


@pytest.mark.timeout(300)
def test_compress_api_conforms_to_its_spec() -> None:
    settings_ = CompressSettings(compress_workers=1, fetch_timeout_seconds=2)
    app = create_compress_app(settings_)
    started = time.monotonic()
    try:
        report = fuzz(app)
    finally:
        asgi.shutdown_lifespans()
    seconds = time.monotonic() - started
    print(report.summary("compress", seconds))
    assert report.total >= MIN_CASES, report.summary("compress", seconds)
    assert not report.failures, report.failure_text()


def _job_cases(schema: Any, job_ids: list[str]) -> Iterator[AnyCase]:
    """The job routes with ids of jobs that exist, which random ids never hit."""
    for job_id in job_ids:
        for path, method in (
            ("/jobs/{job_id}", "GET"),
            ("/jobs/{job_id}/file", "GET"),
            ("/jobs/{job_id}", "DELETE"),
            ("/jobs/{job_id}", "GET"),
        ):
            yield schema[path][method].Case(path_parameters={"job_id": job_id})


def _wait_until_finished(schema: Any, job_ids: list[str], limit: float = 20) -> None:
    """Poll the jobs so a failed job's view (with its error) is among those checked."""
    deadline = time.monotonic() + limit
    for job_id in job_ids:
        while time.monotonic() < deadline:
            case = schema["/jobs/{job_id}"]["GET"].Case(path_parameters={"job_id": job_id})
            if case.call().json().get("status") in ("failed", "succeeded"):
                break
            time.sleep(0.2)


@pytest.mark.timeout(300)
def test_clip_api_conforms_to_its_spec(tmp_path: Path) -> None:
    settings_ = ClipSettings(clip_max_queued=100_000, clip_work_dir=tmp_path)
    app = create_clip_app(settings_)
    started = time.monotonic()
    try:
        report = fuzz(app)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # Valid-looking requests queued real jobs; they fail fast (YouTube is out of reach).
        first = report.accepted_jobs[:10]
        _wait_until_finished(schema, first[:1])
        for case in _job_cases(schema, first):
            _check(report, case, "existing job")
    finally:
        stopping = time.monotonic()
        asgi.shutdown_lifespans()
        shutdown = time.monotonic() - stopping
    seconds = time.monotonic() - started
    print(report.summary("clip", seconds))
    print(f"clip: {len(report.accepted_jobs)} jobs queued, shutdown took {shutdown:.1f} s")
    assert report.total >= MIN_CASES, report.summary("clip", seconds)
    assert not report.failures, report.failure_text()
    assert report.accepted_jobs, "no generated request was accepted: the examples did not run"
    assert shutdown < 15, f"the clip app took {shutdown:.1f} s to shut down"
    # The job database and its lock stay (they are how a restart resumes); no job directory.
    left = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert not left, "job directories were left behind after shutdown"


# ---------------------------------------------------------------------------------------------
# 2. Properties of the request parsers and of the address guard.
# ---------------------------------------------------------------------------------------------

TIME_CHARS = "0123456789:.,;-+eE \t\n٣"


@st.composite
def timecodes(draw: st.DrawFn) -> tuple[str, float]:
    """A valid HH:MM:SS, MM:SS or seconds text, and the number of seconds it means."""
    shape = draw(st.sampled_from(["hms", "ms", "s"]))
    hours = draw(st.integers(0, 99_999)) if shape == "hms" else 0
    minutes = draw(st.integers(0, 59)) if shape != "s" else 0
    whole = draw(st.integers(0, 59)) if shape != "s" else draw(st.integers(0, 10**9))
    fraction = draw(st.none() | st.text("0123456789", min_size=1, max_size=6))
    seconds = f"{whole:02d}" if draw(st.booleans()) else str(whole)
    if fraction is not None:
        seconds += "." + fraction
    minute_text = f"{minutes:02d}" if draw(st.booleans()) else str(minutes)
    hour_text = f"{hours:02d}" if draw(st.booleans()) else str(hours)
    text = {
        "hms": f"{hour_text}:{minute_text}:{seconds}",
        "ms": f"{minute_text}:{seconds}",
        "s": seconds,
    }[shape]
    pad = draw(st.sampled_from(["", " ", "\t", " \n"]))
    expected = hours * 3600 + minutes * 60 + whole
    if fraction is not None:
        expected += int(fraction) / 10 ** len(fraction)
    return f"{pad}{text}{pad}", expected


@QUICK
@given(timecodes())
def test_parse_time_round_trips(timecode: tuple[str, float]) -> None:
    text, expected = timecode
    assert math.isclose(parse_time(text, "start_time"), expected, rel_tol=1e-12, abs_tol=1e-9)


@QUICK
@given(
    st.one_of(
        st.text(max_size=64),
        st.text(alphabet=TIME_CHARS, max_size=40),
        st.from_regex(TIMECODE, fullmatch=True),
    )
)
def test_parse_time_parses_or_refuses(raw: str) -> None:
    check_parse_time(raw)


# Hours too large for a float, and longer than Python's int-to-text limit (4300 digits).
# Unreachable through the API (max_length=32), but parse_time promises InvalidTime.
@pytest.mark.parametrize("raw", ["9" * 400 + ":00:00", "9" * 5000 + ":00:00", "9" * 5000])
def test_parse_time_refuses_absurd_numbers(raw: str) -> None:
    check_parse_time(raw)


def check_parse_time(raw: str) -> None:
    try:
        value = parse_time(raw, "start_time")
    except InvalidTime:
        return
    assert value >= 0
    assert not math.isnan(value)
    if len(raw) <= 32:  # the API's max_length
        assert math.isfinite(value)


ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
VIDEO_IDS = st.text(alphabet=ID_CHARS, min_size=11, max_size=11)
PATH_FORMS = ("shorts", "embed", "live", "v", "e")
# Parameter names other than `v`, whatever they decode to.
EXTRA_PARAMS = st.lists(
    st.tuples(st.from_regex(r"[a-uw-z][a-z0-9_]{0,8}", fullmatch=True), st.text(max_size=12)),
    max_size=4,
)


def _shuffle_case(rng: random.Random, text: str) -> str:
    return "".join(ch.upper() if rng.random() < 0.5 else ch for ch in text)


@st.composite
def youtube_links(draw: st.DrawFn) -> tuple[str, str]:
    """Any accepted link to a video, and its id."""
    video_id = draw(VIDEO_IDS)
    rng = draw(st.randoms(use_true_random=False))
    host = draw(st.sampled_from(sorted(YOUTUBE_HOSTS)))
    extra = draw(EXTRA_PARAMS)
    pad = draw(st.sampled_from(["", " ", "\t", "\n "]))
    if draw(st.integers(0, 9)) == 0:
        return f"{pad}{video_id}{pad}", video_id
    netloc = _shuffle_case(rng, host) + draw(st.sampled_from(["", "."]))
    netloc += draw(st.sampled_from(["", ":443", ":80"]))
    scheme = draw(st.sampled_from(["https", "http", "HTTPS"]))
    if host.endswith("youtu.be"):
        path, params = f"/{video_id}", list(extra)
    elif draw(st.booleans()):
        params = list(extra)
        params.insert(draw(st.integers(0, len(params))), ("v", video_id))
        path = "/watch"
    else:
        form = draw(st.sampled_from(PATH_FORMS))
        tail = draw(st.sampled_from(["", "/", "/extra"]))
        path, params = f"/{form}/{video_id}{tail}", list(extra)
    query = f"?{urlencode(params)}" if params else ""
    fragment = draw(st.sampled_from(["", "#t=42", "#"]))
    return f"{pad}{scheme}://{netloc}{path}{query}{fragment}{pad}", video_id


@QUICK
@given(youtube_links())
def test_parse_source_rebuilds_every_link_shape(link: tuple[str, str]) -> None:
    text, video_id = link
    assert parse_source(text, frozenset()) == SourceUrl(url=WATCH + video_id, video_id=video_id)


URLISH = st.builds(
    "{}{}{}{}".format,
    st.sampled_from(["https://", "http://", "ftp://", "//", "", "https:///", "https://u:p@"]),
    st.one_of(st.sampled_from(sorted(YOUTUBE_HOSTS)), st.text(max_size=12)),
    st.one_of(
        st.sampled_from(["/watch?v=", "/shorts/", "/embed/", "/", ":99/watch?v=", "/playlist"]),
        st.text(max_size=12),
    ),
    st.one_of(VIDEO_IDS, st.text(max_size=16), st.from_regex(r"[A-Za-z0-9_%-]{9,14}")),
)


@QUICK
@given(st.one_of(st.text(max_size=80), URLISH))
def test_parse_source_rebuilds_or_refuses(raw: str) -> None:
    check_parse_source(raw)


# A %0A after the id decodes to a newline, which `$` in VIDEO_ID lets through.
@pytest.mark.parametrize(
    "raw",
    [
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ%0A",
        "https://youtube.com/watch?list=x&v=dQw4w9WgXcQ%0A",
        "https://m.youtube.com/watch?v=dQw4w9WgXcQ%0a&t=1",
    ],
)
def test_parse_source_refuses_an_id_with_a_newline(raw: str) -> None:
    check_parse_source(raw)


def check_parse_source(raw: str) -> None:
    try:
        source = parse_source(raw, frozenset())
    except InvalidUrl:
        return
    assert source.video_id is not None
    assert re.fullmatch(r"[A-Za-z0-9_-]{11}", source.video_id), source
    assert source.url == WATCH + source.video_id


def _v4(network: str) -> st.SearchStrategy[ipaddress.IPv4Address]:
    net = ipaddress.IPv4Network(network)
    low, high = int(net.network_address), int(net.broadcast_address)
    return st.integers(low, high).map(ipaddress.IPv4Address)


REFUSED_V4 = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
# Every special-purpose IPv4 block (IANA registry), which "global" addresses are drawn outside.
SPECIAL_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        *REFUSED_V4,
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
    )
)
ANY_V4 = st.integers(0, 2**32 - 1)
BITS_80 = st.integers(0, 2**80 - 1)


EMBEDDING_FORMS = ("mapped", "compatible", "translated", "6to4", "nat64", "nat64-local", "teredo")


def _embedded(kind: str, v4: int, low: int) -> ipaddress.IPv6Address:
    """The IPv6 forms that carry an IPv4 address (``low`` fills the bits they leave free)."""
    teredo_middle = (low & 0xFFFF_FFFF_FFFF_FFFF) << 32  # server, flags, port
    forms = {
        "mapped": (0xFFFF << 32) | v4,  # ::ffff:a.b.c.d
        "compatible": v4,  # ::a.b.c.d
        "translated": (0xFFFF << 48) | v4,  # ::ffff:0:a.b.c.d (SIIT)
        "6to4": (0x2002 << 112) | (v4 << 80) | low,  # 2002:AABB:CCDD::/48
        "nat64": (0x64FF9B << 96) | v4,  # 64:ff9b::a.b.c.d
        "nat64-local": (0x64FF9B0001 << 80) | low,  # 64:ff9b:1::/48
        "teredo": (0x2001_0000 << 96) | teredo_middle | (~v4 & 0xFFFF_FFFF),  # 2001::/32
    }
    return ipaddress.IPv6Address(forms[kind])


@QUICK
@given(st.one_of(*(_v4(n) for n in REFUSED_V4)))
def test_every_private_or_special_ipv4_is_refused(address: ipaddress.IPv4Address) -> None:
    assert is_refused_address(address)


@QUICK
@given(
    st.sampled_from(EMBEDDING_FORMS),
    ANY_V4,
    BITS_80,
)
def test_every_ipv6_form_carrying_ipv4_is_refused(kind: str, v4: int, low: int) -> None:
    address = _embedded(kind, v4, low)
    assert is_refused_address(address), f"{kind} {address} carrying {ipaddress.IPv4Address(v4)}"


@QUICK
@given(ANY_V4.map(ipaddress.IPv4Address).filter(lambda ip: not any(ip in n for n in SPECIAL_V4)))
def test_global_ipv4_is_allowed(address: ipaddress.IPv4Address) -> None:
    assert not is_refused_address(address)


# ---------------------------------------------------------------------------------------------
# 3. Hostile bytes through the real compress app over HTTP: only 200 or a 4xx error body.
# ---------------------------------------------------------------------------------------------

UPLOAD = "/compress-an-image/upload"
MAGIC = (
    b"",
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"\x00\x00\x01\x00",
    b"\x00\x00\x00\x1cftypavif",
    b"\x00\x00\x00\x18ftypheic",
)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return samples()


@pytest.fixture(scope="module")
def compress_app() -> FastAPI:
    return create_compress_app(CompressSettings(compress_workers=2))


@pytest.fixture(scope="module")
def upload_api(compress_app: FastAPI) -> Iterator[httpx.Client]:
    with client(compress_app) as http:
        yield http


def upload(api: httpx.Client, data: bytes, name: str = "image.bin") -> httpx.Response:
    return api.post(UPLOAD, files={"file": (name, data)}, data={"quality": "80"})


def problem(response: httpx.Response) -> str | None:
    """Why an answer is not a 200 image or a 4xx error body, or None when it is."""
    if response.status_code == 200:
        kind = response.headers.get("content-type", "")
        return None if kind.startswith("image/") else f"200 with content-type {kind!r}"
    if not 400 <= response.status_code < 500:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    try:
        body = response.json()
        message = body["error"]["message"]
        shaped = (
            set(body) == {"detail", "error"}
            and set(body["error"]) == {"code", "message"}
            and isinstance(body["error"]["code"], str)
            and isinstance(message, str)
            and body["detail"] == message
        )
    except (ValueError, KeyError, TypeError):
        shaped = False
    return None if shaped else f"HTTP {response.status_code} body {response.text[:300]!r}"


def verdict(api: httpx.Client, data: bytes, name: str = "image.bin") -> str | None:
    """``problem`` of the upload's answer; a lost connection is tried once more.

    After an exception reaches uvicorn (a 500), it closes the keep-alive connection without
    saying so, and the next request on it gets no answer: that one is sent again.
    """
    try:
        response = upload(api, data, name)
    except httpx.TransportError:
        try:
            response = upload(api, data, name)
        except httpx.TransportError as exc:
            return f"no answer: {exc!r}"
    return problem(response)


def assert_alive(api: httpx.Client, images: dict[str, bytes]) -> None:
    assert api.get("/healthz").status_code == 200
    response = upload(api, images["animated.gif"], "animated.gif")
    assert response.status_code == 200, response.text


@pytest.mark.timeout(300)
@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    prefix=st.sampled_from(MAGIC),
    length=st.one_of(st.integers(0, 64), st.integers(0, 300_000)),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_bytes_get_a_4xx(
    upload_api: httpx.Client, prefix: bytes, length: int, seed: int
) -> None:
    data = prefix + random.Random(seed).randbytes(length)
    found = verdict(upload_api, data)
    assert found is None, f"{len(data)} bytes {data[:64]!r}: {found}"


def cut_points(size: int) -> list[int]:
    points = {0, 1, 8, 16, 64, size // 4, size // 2, 3 * size // 4, size - 100, size - 1}
    return sorted(p for p in points if 0 <= p < size)


def flipped(data: bytes, seed: str, count: int = 10) -> Iterator[tuple[str, bytes]]:
    """Copies of ``data`` with a few random bytes changed: half in the header, half anywhere."""
    rng = random.Random(seed)
    for index in range(count):
        out = bytearray(data)
        span = min(len(out), 256) if index % 2 == 0 else len(out)
        positions = sorted(rng.randrange(span) for _ in range(rng.randint(1, 8)))
        for position in positions:
            out[position] ^= rng.randint(1, 255)
        yield f"flip {positions}", bytes(out)


@pytest.mark.timeout(300)
def test_truncated_and_corrupted_samples_get_a_4xx(
    upload_api: httpx.Client, images: dict[str, bytes]
) -> None:
    problems: list[str] = []
    sent = 0
    started = time.monotonic()
    for name, data in images.items():
        variants = [(f"cut at {p}", data[:p]) for p in cut_points(len(data))]
        variants += list(flipped(data, name, count=6))
        for how, variant in variants:
            sent += 1
            if (found := verdict(upload_api, variant, name)) is not None:
                problems.append(f"{name} ({len(data)} bytes) {how}: {found}")
        assert_alive(upload_api, images)
    print(f"{sent} truncated or corrupted images in {time.monotonic() - started:.1f} s")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_the_service_survives_killed_workers(
    compress_app: FastAPI, upload_api: httpx.Client, images: dict[str, bytes]
) -> None:
    """A worker that dies (as on a hostile file) costs at most the request it was serving."""
    assert_alive(upload_api, images)
    workers = list(compress_app.state.pool._executor._processes.values())
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    for worker in workers:
        worker.join(timeout=10)
    answers = []
    for _ in range(4):
        response = upload(upload_api, images["animated.gif"], "animated.gif")
        assert problem(response) is None, problem(response)
        answers.append(response.status_code)
    # The request that finds the pool broken may get a 422; the pool is then replaced.
    assert answers[-2:] == [200, 200], answers
