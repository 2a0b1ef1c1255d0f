"""Benchmark of ``services.compress.codecs.compress`` against Pillow's own best save.

Every figure is a ratio against a baseline measured in the same run: the two sides of each
timing run alternately (which one goes first alternates too) and a ratio is the median of
several such paired repetitions, because the machine is noisy. It measures:

1. Bytes and time of ``compress()`` against Pillow's best save at the same quality, per format
   (JPEG photos, PNG photo, PNG screenshot-like image, WebP photos, AVIF photos) and quality.
2. JPEG bytes at an equal SSIMULACRA2 score: for each photo and Pillow quality q, the lowest
   quality at which ``compress()`` scores at least Pillow's score (bisection over 1..100), and
   the bytes and time of that encode against Pillow's at q. Goal: <= 0.85x bytes, <= 1.5x time.
3. The screenshot-like PNG at quality 85. Goal: <= 0.5x Pillow's optimised PNG.
4. Through HTTP, the real server on loopback: images per second of the upload route with one
   sequential client against bare ``compress()`` called in this process (goal >= 0.85x), and
   with two concurrent clients against one (goal >= 1.7x).
5. Already-compressed JPEGs (real ones shipped with scikit-image and matplotlib, and photos
   saved by Pillow at 90 and 95 as cameras do) asked for 60, 75, 85 and 95: bytes of
   ``compress()`` over the input's and its SSIMULACRA2 against the input, beside Pillow's
   re-save at the same number and the lossless optimisation alone.

Run ``python -m bench.compress``; ``--quick`` is a smoke run, ``--out PATH`` also writes the
Markdown report to a file.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import IO

import httpx
import matplotlib
import skimage
import ssimulacra2
from PIL import Image, ImageDraw, ImageOps, features

from services.compress.codecs import Limits, compress

# Far above every input here, so the limits never change what is measured.
LIMITS = Limits(max_pixels=100_000_000, max_frames=1000)
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
MATPLOTLIB_DATA = Path(matplotlib.get_data_path()) / "sample_data"
# Section 5: JPEGs as they come, and photos saved as cameras save them (Pillow at 90, 4:2:0; at
# 95, 4:4:4). None of them was used to calibrate the re-encode (motorcycle_right and rocket
# were).
REAL_JPEGS = {
    "grace_hopper": MATPLOTLIB_DATA / "grace_hopper.jpg",
    "hubble_deep_field": SKIMAGE_DATA / "hubble_deep_field.jpg",
    "retina": SKIMAGE_DATA / "retina.jpg",
}
CAMERA_SAVES = {"q90-420": (90, "4:2:0"), "q95-444": (95, "4:4:4")}
SERVICE_QUALITIES = (60, 75, 85, 95)
PHOTOS = ("astronaut", "coffee", "chelsea", "motorcycle_left")
BIG = "coffee-2mp"
SCREENSHOT = "screenshot"
SOURCE_QUALITY = 98
# Pillow's best save per format; quality is added for the lossy ones.
BASELINE: dict[str, dict[str, object]] = {
    "JPEG": {"optimize": True, "progressive": True},
    "PNG": {"optimize": True},
    "WEBP": {"method": 6},
    "AVIF": {},
}
JPEG_BYTES_GOAL = 0.85
JPEG_TIME_GOAL = 1.5
SCREENSHOT_QUALITY = 85
SCREENSHOT_GOAL = 0.5
HTTP_QUALITY = 85
HTTP_ONE_GOAL = 0.85
HTTP_TWO_GOAL = 1.7
HEALTH_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Plan:
    mode: str
    qualities: tuple[int, ...]
    photos: tuple[str, ...]
    avif_photos: tuple[str, ...]
    png_photo: str
    big_in_webp: bool
    big_equal_score: bool
    reps: int
    slow_reps: int
    http_rounds: int
    http_requests: int


FULL = Plan(
    mode="full",
    qualities=(60, 75, 85, 95),
    photos=PHOTOS,
    avif_photos=PHOTOS,
    png_photo="motorcycle_left",
    big_in_webp=True,
    big_equal_score=True,
    reps=7,
    slow_reps=3,
    http_rounds=5,
    http_requests=8,
)
QUICK = Plan(
    mode="quick (--quick, a smoke run: figures are indicative only)",
    qualities=(60, 85),
    photos=("astronaut", "chelsea"),
    avif_photos=("chelsea",),
    png_photo="chelsea",
    big_in_webp=False,
    big_equal_score=False,
    reps=3,
    slow_reps=2,
    http_rounds=2,
    http_requests=4,
)


@dataclass(frozen=True)
class Pair:
    bytes_ratio: float
    time_ratio: float
    returned_input: bool


@dataclass(frozen=True)
class Group:
    title: str
    fmt: str
    sources: dict[str, bytes]
    reps: int


@dataclass(frozen=True)
class ScoreJob:
    photo: str
    reference: bytes
    source: bytes
    qualities: tuple[int, ...]


@dataclass(frozen=True)
class EqualScore:
    photo: str
    quality: int
    pillow_bytes: int
    pillow_score: float
    ours_quality: int
    ours_bytes: int
    ours_score: float

    @property
    def reached(self) -> bool:
        return self.ours_score >= self.pillow_score


@dataclass(frozen=True)
class Service:
    """One already-compressed JPEG asked for one quality."""

    name: str
    quality: int
    input_bytes: int
    ours_bytes: int
    ours_score: float
    method: str
    compressed: bool
    pillow_bytes: int
    pillow_score: float
    lossless_bytes: int


@dataclass(frozen=True)
class Http:
    one_vs_bare: float
    two_vs_one: float
    same_bytes: bool


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Inputs


def _photo(name: str) -> Image.Image:
    with Image.open(SKIMAGE_DATA / f"{name}.png") as image:
        return image.convert("RGB")


def _big_photo() -> Image.Image:
    """coffee (600x400) upscaled 1.5x with Lanczos, tiled 2x2 with mirrored copies: 1800x1200."""
    tile = _photo("coffee").resize((900, 600), Image.Resampling.LANCZOS)
    big = Image.new("RGB", (1800, 1200))
    big.paste(tile, (0, 0))
    big.paste(ImageOps.mirror(tile), (900, 0))
    big.paste(ImageOps.flip(tile), (0, 600))
    big.paste(ImageOps.flip(ImageOps.mirror(tile)), (900, 600))
    return big


def _gradient(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], start: int) -> None:
    left, top, right, bottom = box
    for x in range(left, right):
        shade = start + (x - left) * 60 // (right - left)
        draw.line([(x, top), (x, bottom)], fill=(shade // 3, shade // 2 + 40, shade + 60))


def _screenshot() -> Image.Image:
    """A 1280x800 UI: flat panels, text in Pillow's default font, gradients, a line chart."""
    rng = random.Random(7)
    image = Image.new("RGB", (1280, 800), (243, 244, 246))
    draw = ImageDraw.Draw(image)
    _gradient(draw, (0, 0, 1280, 47), 60)
    draw.text((16, 17), "hermes-media  /  Dashboard  /  Images", fill="white")
    draw.rectangle((0, 48, 219, 799), fill=(31, 41, 55))
    menu = ("Overview", "Uploads", "Images", "Clips", "Queues", "Workers", "Settings", "Help")
    for index, label in enumerate(menu):
        top = 72 + index * 36
        if label == "Images":
            draw.rectangle((8, top - 8, 211, top + 20), fill=(55, 65, 81))
        draw.text((24, top), label, fill=(209, 213, 219))
    for column in range(3):
        for row in range(2):
            left, top = 240 + column * 340, 68 + row * 170
            draw.rectangle(
                (left, top, left + 320, top + 150), fill="white", outline=(229, 231, 235)
            )
            draw.text((left + 16, top + 14), f"Metric {row * 3 + column + 1}", fill=(107, 114, 128))
            draw.text((left + 16, top + 40), f"{rng.randint(1000, 99999):,}", fill=(17, 24, 39))
            for line in range(3):
                words = " ".join(rng.choice(("images", "saved", "bytes", "today")) for _ in "abcd")
                draw.text((left + 16, top + 66 + line * 16), words, fill=(75, 85, 99))
            _gradient(draw, (left + 16, top + 124, left + 16 + rng.randint(60, 288), top + 132), 90)
    draw.rectangle((240, 420, 1260, 780), fill="white", outline=(229, 231, 235))
    for row in range(14):
        top = 452 + row * 22
        if row % 2:
            draw.rectangle((241, top - 4, 759, top + 16), fill=(249, 250, 251))
        cells = (f"IMG_{rng.randint(1000, 9999)}.jpg", f"{rng.randint(10, 9000)} KB", "done")
        for column, cell in enumerate(cells):
            draw.text((256 + column * 170, top), cell, fill=(55, 65, 81))
    draw.text((256, 430), "File                  Size                  Status", fill=(17, 24, 39))
    points = [(780 + step * 24, 740 - rng.randint(0, 280)) for step in range(20)]
    draw.line(points, fill=(37, 99, 235), width=3)
    draw.line([(780, 742), (1240, 742)], fill=(156, 163, 175))
    return image


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _source(image: Image.Image, fmt: str) -> bytes:
    """What compress() is given: a lossless PNG, or the target format at quality 98."""
    if fmt == "PNG":
        return _save(image, "PNG")
    return _save(image, fmt, quality=SOURCE_QUALITY)


# Encoders and timing


def _ours(source: bytes, quality: int) -> bytes:
    return compress(
        source, quality=quality, strip_metadata=False, keep_location=False, limits=LIMITS
    ).data


def _pillow(source: bytes, fmt: str, quality: int) -> bytes:
    """Pillow's best save of the decoded source (decoding included, as compress() does it)."""
    options = dict(BASELINE[fmt])
    if fmt != "PNG":
        options["quality"] = quality
    with Image.open(io.BytesIO(source)) as image:
        return _save(image, fmt, **options)


def _timed(encode: Callable[[], bytes]) -> tuple[float, bytes]:
    start = time.perf_counter()
    data = encode()
    return time.perf_counter() - start, data


def _interleaved(
    ours: Callable[[], bytes], base: Callable[[], bytes], reps: int
) -> tuple[bytes, bytes, float]:
    """Both outputs and the median of ``reps`` paired time ratios ours/base."""
    ratios: list[float] = []
    ours_data = base_data = b""
    for rep in range(reps):
        if rep % 2:
            base_seconds, base_data = _timed(base)
            ours_seconds, ours_data = _timed(ours)
        else:
            ours_seconds, ours_data = _timed(ours)
            base_seconds, base_data = _timed(base)
        ratios.append(ours_seconds / base_seconds)
    return ours_data, base_data, statistics.median(ratios)


# 1. Bytes and time per format


def _measure_pair(source: bytes, fmt: str, quality: int, reps: int) -> Pair:
    ours, base, time_ratio = _interleaved(
        lambda: _ours(source, quality), lambda: _pillow(source, fmt, quality), reps
    )
    return Pair(len(ours) / len(base), time_ratio, returned_input=ours == source)


def _per_format(
    groups: Sequence[Group], qualities: Sequence[int]
) -> dict[tuple[str, str, int], Pair]:
    pairs: dict[tuple[str, str, int], Pair] = {}
    for group in groups:
        _log(f"1. {group.title}")
        for quality in qualities:
            for name, source in group.sources.items():
                pairs[group.title, name, quality] = _measure_pair(
                    source, group.fmt, quality, group.reps
                )
    return pairs


def _span(values: Sequence[float], digits: int) -> str:
    mean, low, high = statistics.geometric_mean(values), min(values), max(values)
    return f"{mean:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"


def _per_format_table(
    groups: Sequence[Group], qualities: Sequence[int], pairs: dict[tuple[str, str, int], Pair]
) -> list[str]:
    rows: list[list[str]] = []
    for group in groups:
        for quality in qualities:
            found = [pairs[group.title, name, quality] for name in group.sources]
            returned = sum(pair.returned_input for pair in found)
            rows.append(
                [
                    group.title,
                    str(quality),
                    str(len(found)),
                    _span([pair.bytes_ratio for pair in found], 3),
                    _span([pair.time_ratio for pair in found], 2),
                    str(returned),
                ]
            )
    header = ["Input", "Quality", "Images", "Bytes ours/Pillow", "Time ours/Pillow", "Input kept"]
    return _table(header, rows)


# 2. JPEG at equal SSIMULACRA2


def _score(reference: bytes, distorted: bytes) -> float:
    return float(ssimulacra2.compute_ssimulacra2(io.BytesIO(reference), io.BytesIO(distorted)))


def _equal_scores(job: ScoreJob) -> list[EqualScore]:
    """Runs in a worker process: Pillow's score at each quality, then ours bisected to match."""
    ours: dict[int, tuple[int, float]] = {}

    def ours_at(quality: int) -> tuple[int, float]:
        if quality not in ours:
            data = _ours(job.source, quality)
            ours[quality] = len(data), _score(job.reference, data)
        return ours[quality]

    results: list[EqualScore] = []
    for quality in job.qualities:
        pillow = _pillow(job.source, "JPEG", quality)
        target = _score(job.reference, pillow)
        low, high = 1, 100
        while low < high:
            middle = (low + high) // 2
            if ours_at(middle)[1] >= target:
                high = middle
            else:
                low = middle + 1
        size, score = ours_at(low)
        results.append(EqualScore(job.photo, quality, len(pillow), target, low, size, score))
    return results


def _equal_score_jobs(
    plan: Plan, references: dict[str, bytes], sources: dict[str, bytes]
) -> list[EqualScore]:
    jobs = [ScoreJob(name, references[name], sources[name], plan.qualities) for name in plan.photos]
    if plan.big_equal_score:
        # First, as the longest (about 6 s per score), so the other worker takes the rest.
        jobs.insert(0, ScoreJob(BIG, references[BIG], sources[BIG], (HTTP_QUALITY,)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=context) as pool:
        found = [result for results in pool.map(_equal_scores, jobs) for result in results]
    order = [*plan.photos, BIG]
    return sorted(found, key=lambda result: (order.index(result.photo), result.quality))


def _equal_score_section(
    results: Sequence[EqualScore], sources: dict[str, bytes], reps: int
) -> tuple[list[str], bool]:
    rows: list[list[str]] = []
    bytes_ratios: list[float] = []
    time_ratios: list[float] = []
    for result in results:
        source = sources[result.photo]
        _log(f"2. timing {result.photo} q{result.quality} against ours q{result.ours_quality}")
        _, _, time_ratio = _interleaved(
            partial(_ours, source, result.ours_quality),
            partial(_pillow, source, "JPEG", result.quality),
            reps,
        )
        bytes_ratio = result.ours_bytes / result.pillow_bytes
        bytes_ratios.append(bytes_ratio)
        time_ratios.append(time_ratio)
        rows.append(
            [
                result.photo,
                str(result.quality),
                f"{result.pillow_score:.2f}",
                str(result.ours_quality),
                f"{result.ours_score:.2f}" + ("" if result.reached else " (not reached)"),
                f"{bytes_ratio:.3f}",
                f"{time_ratio:.2f}",
            ]
        )
    bytes_mean = statistics.geometric_mean(bytes_ratios)
    time_mean = statistics.geometric_mean(time_ratios)
    all_reached = all(result.reached for result in results)
    passed = all_reached and bytes_mean <= JPEG_BYTES_GOAL and time_mean <= JPEG_TIME_GOAL
    rows.append(
        [
            "**geometric mean**",
            "",
            "",
            "",
            "all reached" if all_reached else "**some not reached**",
            f"**{bytes_mean:.3f}**",
            f"**{time_mean:.2f}**",
        ]
    )
    header = [
        "Photo",
        "Pillow q",
        "Pillow score",
        "Ours q",
        "Ours score",
        "Bytes ours/Pillow",
        "Time ours/Pillow",
    ]
    lines = _table(header, rows)
    lines += [
        "",
        f"Goal: bytes <= {JPEG_BYTES_GOAL}x and time <= {JPEG_TIME_GOAL}x Pillow's at an equal "
        f"score (geometric means), every score reached: **{_verdict(passed)}** "
        f"(bytes {_verdict(bytes_mean <= JPEG_BYTES_GOAL)}, "
        f"time {_verdict(time_mean <= JPEG_TIME_GOAL)}).",
    ]
    return lines, passed


# 4. Through HTTP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(server: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    log.seek(0)
    output = log.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"The server at {url} did not become healthy:\n{output}")


def _upload(client: httpx.Client, url: str, source: bytes) -> bytes:
    response = client.post(
        url,
        files={"file": ("photo.jpg", source, "image/jpeg")},
        data={"quality": str(HTTP_QUALITY)},
    )
    if response.status_code != 200:
        raise RuntimeError(f"POST {url}: {response.status_code} {response.text[:500]}")
    return response.content


def _bare_rate(source: bytes, requests: int) -> tuple[float, bytes]:
    start = time.perf_counter()
    data = b""
    for _ in range(requests):
        data = _ours(source, HTTP_QUALITY)
    return requests / (time.perf_counter() - start), data


def _client_rate(
    clients: Sequence[httpx.Client], url: str, source: bytes, requests: int
) -> tuple[float, bytes]:
    """Images per second with each client sending its share of ``requests`` one after another."""
    share = requests // len(clients)

    def send(client: httpx.Client) -> bytes:
        data = b""
        for _ in range(share):
            data = _upload(client, url, source)
        return data

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        outputs = list(pool.map(send, clients))
    return share * len(clients) / (time.perf_counter() - start), outputs[0]


def _http(plan: Plan, source: bytes) -> Http:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/compress-an-image/upload"
    # Every setting at its default (no Ouro secret, one worker per core) but private networks.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HERMES_")}
    env["HERMES_ALLOW_PRIVATE_NETWORKS"] = "true"
    command = [str(Path(sys.executable).parent / "hermes-media"), "serve", "compress"]
    command += ["--port", str(port)]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(server, f"{base}/healthz", log)
            with httpx.Client(timeout=60.0) as first, httpx.Client(timeout=60.0) as second:
                _client_rate([first, second], url, source, 2)  # warm both workers
                one_vs_bare: list[float] = []
                two_vs_one: list[float] = []
                outputs: set[bytes] = set()
                phases = ("bare", "one", "two")
                for round_ in range(plan.http_rounds):
                    rates: dict[str, float] = {}
                    shift = round_ % len(phases)
                    for phase in phases[shift:] + phases[:shift]:
                        _log(f"4. round {round_ + 1}: {phase}")
                        if phase == "bare":
                            rate, data = _bare_rate(source, plan.http_requests)
                        elif phase == "one":
                            rate, data = _client_rate([first], url, source, plan.http_requests)
                        else:
                            rate, data = _client_rate(
                                [first, second], url, source, plan.http_requests
                            )
                        rates[phase] = rate
                        outputs.add(data)
                    one_vs_bare.append(rates["one"] / rates["bare"])
                    two_vs_one.append(rates["two"] / rates["one"])
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return Http(
        one_vs_bare=statistics.median(one_vs_bare),
        two_vs_one=statistics.median(two_vs_one),
        same_bytes=len(outputs) == 1,
    )


# 5. Already-compressed JPEGs through compress()


def _service_inputs(plan: Plan) -> dict[str, bytes]:
    inputs = {name: path.read_bytes() for name, path in REAL_JPEGS.items()}
    for photo in plan.photos:
        for label, (quality, subsampling) in CAMERA_SAVES.items():
            image = _photo(photo)
            inputs[f"{photo}-{label}"] = _save(
                image, "JPEG", quality=quality, subsampling=subsampling
            )
    return inputs


def _png_of(jpeg: bytes) -> bytes:
    with Image.open(io.BytesIO(jpeg)) as image:
        return _save(image.convert("RGB"), "PNG", compress_level=1)


def _service_case(job: tuple[str, bytes, int]) -> Service:
    """Runs in a worker process: the route, Pillow's re-save and the lossless pass alone."""
    name, source, quality = job
    reference = _png_of(source)
    ours = compress(
        source, quality=quality, strip_metadata=False, keep_location=True, limits=LIMITS
    )
    lossless = compress(
        source, quality=100, strip_metadata=False, keep_location=True, limits=LIMITS
    )
    with Image.open(io.BytesIO(source)) as image:
        pillow = _save(image, "JPEG", quality=quality)
    return Service(
        name=name,
        quality=quality,
        input_bytes=len(source),
        ours_bytes=len(ours.data),
        ours_score=_score(reference, _png_of(ours.data)),
        method=ours.method,
        compressed=ours.compressed,
        pillow_bytes=len(pillow),
        pillow_score=_score(reference, _png_of(pillow)),
        lossless_bytes=len(lossless.data),
    )


def _service(plan: Plan) -> list[Service]:
    inputs = _service_inputs(plan)
    jobs = [(name, data, quality) for quality in SERVICE_QUALITIES for name, data in inputs.items()]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=context) as pool:
        return list(pool.map(_service_case, jobs))


def _service_lines(cases: Sequence[Service]) -> list[str]:
    def mean(values: Sequence[float]) -> str:
        return f"{statistics.fmean(values):.3f}"

    rows: list[list[str]] = []
    for quality in SERVICE_QUALITIES:
        found = [case for case in cases if case.quality == quality]
        worst = min(found, key=lambda case: case.ours_score - case.pillow_score)
        methods = [
            sum(case.compressed and case.method == method for case in found)
            for method in ("lossless", "reencoded")
        ]
        rows.append(
            [
                str(quality),
                str(len(found)),
                mean([case.ours_bytes / case.input_bytes for case in found]),
                f"{statistics.fmean(case.ours_score for case in found):.1f}",
                mean([case.pillow_bytes / case.input_bytes for case in found]),
                f"{statistics.fmean(case.pillow_score for case in found):.1f}",
                mean([case.lossless_bytes / case.input_bytes for case in found]),
                f"{methods[0]} / {methods[1]} / {len(found) - sum(methods)}",
                f"{worst.ours_score - worst.pillow_score:+.1f} ({worst.name})",
            ]
        )
    lines = _table(
        [
            "Quality",
            "Inputs",
            "Route bytes/input",
            "Route score",
            "Pillow re-save bytes/input",
            "Pillow score",
            "Lossless alone bytes/input",
            "Route lossless / re-encoded / input kept",
            "Lowest route - Pillow score",
        ],
        rows,
    )
    lines += ["", "Per input (bytes/input, score):", ""]
    detail = [
        [
            case.name,
            str(case.quality),
            f"{case.ours_bytes / case.input_bytes:.3f}, {case.ours_score:.1f}",
            case.method if case.compressed else "input kept",
            f"{case.pillow_bytes / case.input_bytes:.3f}, {case.pillow_score:.1f}",
            f"{case.lossless_bytes / case.input_bytes:.3f}",
        ]
        for case in sorted(cases, key=lambda case: (case.name, case.quality))
    ]
    return lines + _table(
        ["Input", "Quality", "Route", "Route method", "Pillow re-save", "Lossless alone"], detail
    )


# Report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _cpu_pressure() -> str:
    """Linux's CPU pressure over the last 5 minutes: how much other work competed with the run."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""
    fields = dict(field.split("=") for field in some.split()[1:])
    return (
        f" CPU pressure over the last 5 minutes (`/proc/pressure/cpu`, some avg300): "
        f"{fields.get('avg300', '?')}% of the time some task waited for a CPU; the HTTP "
        "ratios (section 4) are the figures most sensitive to other load on the machine."
    )


def _nproc() -> str:
    return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()


def _baseline_text(fmt: str) -> str:
    options = ", ".join(f"{key}={value}" for key, value in BASELINE[fmt].items())
    return options or "defaults"


def _header(plan: Plan) -> list[str]:
    libraries = ", ".join(
        f"{name} {version(name)}" for name in ("pyvips", "pyvips-binary", "pyoxipng", "imagequant")
    )
    return [
        "# Compression benchmark: `compress()` against Pillow",
        "",
        f"Command: `{shlex.join(sys.orig_argv)}`",
        "",
        f"- Machine: `nproc` = {_nproc()}; Python {sys.version.split()[0]}; "
        f"Pillow {version('pillow')} (libjpeg-turbo {features.version('jpg')}, "
        f"libwebp {features.version('webp')}, libavif {features.version('avif')}); "
        f"{libraries}; ssimulacra2 {version('ssimulacra2')}.",
        f"- Run: {plan.mode}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "- Photos: scikit-image's `skimage/data/*.png` (" + ", ".join(plan.photos) + f"); "
        f"`{BIG}` is coffee (600x400) upscaled 1.5x with Lanczos to 900x600 and tiled 2x2 "
        "with mirrored copies (so the seams are continuous): 1800x1200, 2.16 MP.",
        f"- `{SCREENSHOT}`: 1280x800, drawn with Pillow: flat colour panels, text in "
        "ImageDraw's default font, gradient bars, a table and a line chart.",
        f"- Inputs to `compress()`: a lossless PNG for PNG; for JPEG, WebP and AVIF the photo "
        f"saved by Pillow in that format at quality {SOURCE_QUALITY}. Pillow's baseline decodes "
        "the same input and saves it with its best options: JPEG "
        f"{_baseline_text('JPEG')}; PNG {_baseline_text('PNG')} (lossless, so the same at every "
        f"quality); WebP {_baseline_text('WEBP')}; AVIF {_baseline_text('AVIF')}. "
        "Both times include decoding.",
        "- Every figure is a ratio measured within this run; a time ratio is the median of "
        f"{plan.reps} (JPEG) or {plan.slow_reps} (PNG, WebP, AVIF) paired repetitions in "
        "which the side that runs first alternates. Several images are summarised by the "
        "geometric mean (minimum to maximum).",
        "",
    ]


def _groups(plan: Plan, images: dict[str, Image.Image]) -> list[Group]:
    webp_photos = (*plan.photos, BIG) if plan.big_in_webp else plan.photos
    return [
        Group(
            "JPEG photos",
            "JPEG",
            {name: _source(images[name], "JPEG") for name in (*plan.photos, BIG)},
            plan.reps,
        ),
        Group(
            f"PNG photo ({plan.png_photo})",
            "PNG",
            {plan.png_photo: _source(images[plan.png_photo], "PNG")},
            plan.slow_reps,
        ),
        Group(
            "PNG screenshot",
            "PNG",
            {SCREENSHOT: _source(images[SCREENSHOT], "PNG")},
            plan.slow_reps,
        ),
        Group(
            "WebP photos",
            "WEBP",
            {name: _source(images[name], "WEBP") for name in webp_photos},
            plan.slow_reps,
        ),
        Group(
            "AVIF photos",
            "AVIF",
            {name: _source(images[name], "AVIF") for name in plan.avif_photos},
            plan.slow_reps,
        ),
    ]


def run(plan: Plan) -> str:
    started = time.perf_counter()
    images = {name: _photo(name) for name in PHOTOS}
    images[BIG] = _big_photo()
    images[SCREENSHOT] = _screenshot()
    groups = _groups(plan, images)
    jpeg_sources = groups[0].sources
    references = {name: _source(image, "PNG") for name, image in images.items()}

    pairs = _per_format(groups, plan.qualities)
    screenshot = pairs["PNG screenshot", SCREENSHOT, SCREENSHOT_QUALITY]
    screenshot_passed = screenshot.bytes_ratio <= SCREENSHOT_GOAL
    _log("2. SSIMULACRA2 bisection (parallel, not timed)")
    equal = _equal_score_jobs(plan, references, jpeg_sources)
    equal_lines, equal_passed = _equal_score_section(equal, jpeg_sources, plan.reps)
    _log("4. HTTP")
    http = _http(plan, jpeg_sources[BIG])
    _log("5. already-compressed JPEGs (parallel, not timed)")
    service = _service(plan)
    one_passed = http.one_vs_bare >= HTTP_ONE_GOAL
    two_passed = http.two_vs_one >= HTTP_TWO_GOAL

    lines = _header(plan)
    lines += ["## 1. Bytes and time against Pillow at the same quality", ""]
    lines += _per_format_table(groups, plan.qualities, pairs)
    lines += [
        "",
        "Input kept: images for which `compress()` returned its input because re-encoding "
        "was not smaller.",
        "",
        "## 2. JPEG bytes at an equal SSIMULACRA2 score",
        "",
        "Pillow's score at quality q against the lossless original; ours is the lowest quality "
        "(bisection over 1..100) whose output scores at least as much. Time: one encode at "
        "each side's quality."
        + (
            f" `{BIG}` only at quality {HTTP_QUALITY} (a score takes ~6 s)."
            if plan.big_equal_score
            else ""
        ),
        "",
    ]
    lines += equal_lines
    lines += [
        "",
        f"## 3. Screenshot PNG at quality {SCREENSHOT_QUALITY}",
        "",
    ]
    lines += _table(
        ["Input", "Bytes ours/Pillow optimize=True", "Time ours/Pillow", "Goal", "Result"],
        [
            [
                SCREENSHOT,
                f"{screenshot.bytes_ratio:.3f}",
                f"{screenshot.time_ratio:.2f}",
                f"<= {SCREENSHOT_GOAL}",
                _verdict(screenshot_passed),
            ]
        ],
    )
    lines += [
        "",
        f"## 4. Through HTTP: `{BIG}` JPEG at quality {HTTP_QUALITY}",
        "",
        "`hermes-media serve compress` on loopback (default workers: one per core), "
        f"`POST /compress-an-image/upload` with httpx; {plan.http_rounds} rounds of "
        f"{plan.http_requests} images per phase, phase order rotated each round, median of the "
        "per-round ratios. Bare: `compress()` called sequentially in the benchmark process. "
        "Two clients: each sends half the images, one after another, at the same time.",
        "",
    ]
    lines += _table(
        ["Images per second", "Ratio", "Goal", "Result"],
        [
            [
                "one client / bare compress()",
                f"{http.one_vs_bare:.2f}",
                f">= {HTTP_ONE_GOAL}",
                _verdict(one_passed),
            ],
            [
                "two clients / one client",
                f"{http.two_vs_one:.2f}",
                f">= {HTTP_TWO_GOAL}",
                _verdict(two_passed),
            ],
        ],
    )
    lines += [
        "",
        "The server's output was "
        + ("byte-identical to" if http.same_bytes else "**not** identical to")
        + " the in-process `compress()` output.",
        "",
        "## 5. Already-compressed JPEGs through `compress()`",
        "",
        "Inputs: " + ", ".join(f"`{name}`" for name in REAL_JPEGS) + " as shipped (skimage, "
        "matplotlib), and each photo of section 1 saved by Pillow at "
        + " and ".join(f"{q} ({sub})" for q, sub in CAMERA_SAVES.values())
        + ". Score: SSIMULACRA2 against the decoded input. Pillow re-save: the decoded input "
        "saved at the same number with Pillow's defaults (what the issue compares against). "
        "Lossless alone: `compress()` at quality 100, which for a JPEG is only mozjpeg's "
        "lossless pass. Means are arithmetic.",
        "",
    ]
    lines += _service_lines(service)
    lines += [
        "",
        "## Goals",
        "",
    ]
    lines += _table(
        ["Goal", "Result"],
        [
            [
                f"JPEG at equal score: bytes <= {JPEG_BYTES_GOAL}x, time <= {JPEG_TIME_GOAL}x",
                _verdict(equal_passed),
            ],
            [
                f"Screenshot PNG at quality {SCREENSHOT_QUALITY}: bytes <= {SCREENSHOT_GOAL}x",
                _verdict(screenshot_passed),
            ],
            [f"HTTP one client >= {HTTP_ONE_GOAL}x bare compress()", _verdict(one_passed)],
            [f"HTTP two clients >= {HTTP_TWO_GOAL}x one client", _verdict(two_passed)],
        ],
    )
    lines += ["", f"Whole run: {time.perf_counter() - started:.0f} s.{_cpu_pressure()}", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="A fast smoke run.")
    parser.add_argument("--out", type=Path, help="Also write the Markdown report here.")
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else FULL)
    sys.stdout.write(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
