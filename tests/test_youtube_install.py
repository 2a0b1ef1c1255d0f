"""The default install is YouTube-ready: the package brings a JavaScript runtime yt-dlp accepts
and the challenge solver scripts (``yt-dlp-ejs``) this yt-dlp expects."""

from __future__ import annotations

import importlib.metadata
import re

import yt_dlp
from packaging.requirements import Requirement

from services.clip.toolchain import challenge_solver


def closure(distribution: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution a plain ``pip install <distribution>`` brings, by its metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(distribution, extras)]
    while todo:
        name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            marker = requirement.marker
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if marker is None or any(marker.evaluate(env) for env in environments):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return {name for name, _ in seen}


def test_a_plain_install_of_the_package_brings_deno_and_yt_dlp_ejs() -> None:
    brought = closure("hermes-media")
    assert "yt-dlp" in brought
    missing = {"deno", "yt-dlp-ejs"} - brought
    assert not missing, f"hermes-media's dependencies do not bring {sorted(missing)}"


def test_yt_dlps_default_and_deno_extras_are_what_bring_them() -> None:
    """The requirement the package needs: ``yt-dlp[default,deno]``."""
    assert {"deno", "yt-dlp-ejs"} <= closure("yt-dlp", frozenset({"default", "deno"}))
    assert not {"deno", "yt-dlp-ejs"} & closure("yt-dlp")


def test_yt_dlp_finds_a_runtime_it_accepts_in_this_environment() -> None:
    """Found the way yt-dlp finds it (deno from PyPI lands in the scripts folder)."""
    with yt_dlp.YoutubeDL({"quiet": True}) as ydl:
        info = ydl._js_runtimes["deno"].info
    assert info is not None, "deno is not installed where yt-dlp looks"
    assert info.supported, f"deno {info.version} is older than yt-dlp accepts"


def test_the_challenge_solver_is_the_one_this_yt_dlp_expects() -> None:
    check = challenge_solver()
    assert check.ok, check.detail
