"""Offline calibration of the JPEG re-encode for already-compressed inputs.

Photos that neither the tests nor ``bench.compress`` use (scikit-image's motorcycle_right and
rocket, centre 512x512) are saved by Pillow at 60-95 (4:2:0; 90 also 4:2:2, 95 also 4:4:4),
then each is asked for every quality in ``REQUESTS`` below its own. For each case it prints the
SSIMULACRA2 score against the input and the bytes of Pillow's re-save at that number
(optimize+progressive), of mozjpeg with table 5 at the mapped number, and of mozjpeg with the
Annex K tables at the number, then sums up by the distance between the input's quality and the
requested one. ``services.compress.jpeg.SAME_FAMILY_WITHIN`` comes from this table.

Run ``python -m bench.jpeg_calibration`` (about 200 scores: several minutes on 2 cores).
"""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyvips
import skimage
import ssimulacra2
from PIL import Image

from services.compress.jpeg import _mozjpeg_quality

DATA = Path(skimage.__file__).parent / "data"
PHOTOS = ("motorcycle_right.png", "rocket.jpg")
INPUTS = ((60, "4:2:0"), (75, "4:2:0"), (85, "4:2:0"), (90, "4:2:0"), (95, "4:2:0"),
          (90, "4:2:2"), (95, "4:4:4"))  # fmt: skip
REQUESTS = (40, 50, 60, 70, 75, 80, 85, 90)
SIDE = 512


@dataclass(frozen=True)
class Case:
    photo: str
    source_quality: int
    subsampling: str
    quality: int
    # encoder name -> (bytes, score)
    results: dict[str, tuple[int, float]]


def _photo(name: str) -> Image.Image:
    image = Image.open(DATA / name).convert("RGB")
    left, top = max(0, (image.width - SIDE) // 2), max(0, (image.height - SIDE) // 2)
    return image.crop((left, top, left + min(SIDE, image.width), top + min(SIDE, image.height)))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _pillow(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
    return out.getvalue()


def _mozjpeg(image: Image.Image, quality: int, table: int) -> bytes:
    pixels = pyvips.Image.new_from_memory(image.tobytes(), image.width, image.height, 3, "uchar")
    encoded: bytes = pixels.jpegsave_buffer(
        Q=quality,
        keep="none",
        optimize_coding=True,
        interlace=True,
        quant_table=table,
        subsample_mode="on",
    )
    return encoded


ENCODERS: dict[str, Callable[[Image.Image, int], bytes]] = {
    "pillow": _pillow,
    "table 5, mapped": lambda image, q: _mozjpeg(image, _mozjpeg_quality(q), 5),
    "Annex K": lambda image, q: _mozjpeg(image, q, 0),
}


def _cases(job: tuple[str, int, str]) -> list[Case]:
    photo, source_quality, subsampling = job
    pyvips.concurrency_set(1)
    out = io.BytesIO()
    _photo(photo).save(out, "JPEG", quality=source_quality, subsampling=subsampling)
    decoded = Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    reference = _png(decoded)
    cases = []
    for quality in (q for q in REQUESTS if q < source_quality):
        results = {}
        for name, encode in ENCODERS.items():
            data = encode(decoded, quality)
            distorted = _png(Image.open(io.BytesIO(data)).convert("RGB"))
            score = ssimulacra2.compute_ssimulacra2(io.BytesIO(reference), io.BytesIO(distorted))
            results[name] = (len(data), float(score))
        cases.append(Case(photo, source_quality, subsampling, quality, results))
    return cases


def main() -> None:
    jobs = [(photo, q, sub) for photo in PHOTOS for q, sub in INPUTS]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        cases = [case for found in pool.map(_cases, jobs) for case in found]
    print(
        "| input | asked | "
        + " | ".join(f"{n}: bytes/Pillow, score - Pillow's" for n in ENCODERS)
        + " |"
    )
    print("|---|---|" + "---|" * len(ENCODERS))
    for case in cases:
        base_bytes, base_score = case.results["pillow"]
        cells = [
            f"{size / base_bytes:.2f}, {score - base_score:+.1f}"
            for size, score in case.results.values()
        ]
        label = f"{case.photo} q{case.source_quality} {case.subsampling}"
        print(f"| {label} | {case.quality} | " + " | ".join(cells) + " |")
    print()
    groups = {
        "asked < 15 below the input": lambda c: c.source_quality - c.quality < 15,
        "asked >= 15 below the input": lambda c: c.source_quality - c.quality >= 15,
    }
    print("| cases | n | encoder | score - Pillow's (min, mean) | bytes/Pillow (min-max) |")
    print("|---|---|---|---|---|")
    for label, member in groups.items():
        found = [case for case in cases if member(case)]
        for name in ENCODERS:
            deltas = [c.results[name][1] - c.results["pillow"][1] for c in found]
            ratios = [c.results[name][0] / c.results["pillow"][0] for c in found]
            print(
                f"| {label} | {len(found)} | {name} | {min(deltas):+.1f}, "
                f"{statistics.fmean(deltas):+.1f} | {min(ratios):.2f}-{max(ratios):.2f} |"
            )


if __name__ == "__main__":
    main()
