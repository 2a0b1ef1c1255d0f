"""Operator settings in yt-dlp's own command-line syntax, read by yt-dlp's own parser.

So an operator can paste what works with the ``yt-dlp`` command (``--extractor-args``,
``--js-runtimes``) into ``HERMES_YTDLP_EXTRACTOR_ARGS`` and ``HERMES_YTDLP_JS_RUNTIME``.
"""

from __future__ import annotations

import copy
import functools
from optparse import OptParseError
from typing import Any

import yt_dlp
from yt_dlp.globals import supported_js_runtimes


def parse_extractor_args(text: str) -> dict[str, dict[str, list[str]]]:
    """``IE:key=v1,v2;key2=v`` groups (separated by spaces), as ``--extractor-args`` reads each.

    Raises ``ValueError`` with yt-dlp's complaint when the text is not in its syntax.
    """
    return copy.deepcopy(_extractor_args(text))


def js_runtimes(text: str) -> dict[str, dict[str, str | None]]:
    """``RUNTIME[:PATH]`` as ``--js-runtimes`` reads it: ``{runtime: {"path": PATH or None}}``.

    Raises ``ValueError`` for a runtime yt-dlp does not support.
    """
    return copy.deepcopy(_js_runtimes(text))


@functools.cache
def _extractor_args(text: str) -> dict[str, dict[str, list[str]]]:
    argv = [arg for group in text.split() for arg in ("--extractor-args", group)]
    found: dict[str, dict[str, list[str]]] = _parse_cli(argv)["extractor_args"]
    return found


@functools.cache
def _js_runtimes(text: str) -> dict[str, dict[str, str | None]]:
    found: dict[str, dict[str, str | None]] = _parse_cli(
        ["--no-js-runtimes", "--js-runtimes", text.strip()]
    )["js_runtimes"]
    if not found or not found.keys() <= supported_js_runtimes.value.keys():
        names = ", ".join(supported_js_runtimes.value)
        raise ValueError(f"{text!r} is not RUNTIME[:PATH] with a runtime yt-dlp supports ({names})")
    return found


def _parse_cli(argv: list[str]) -> dict[str, Any]:
    try:
        parsed = yt_dlp.parse_options(["--ignore-config", *argv])
    except (OptParseError, SystemExit) as exc:
        raise ValueError(str(exc).strip().splitlines()[-1].rpartition("error: ")[2]) from exc
    options: dict[str, Any] = parsed.ydl_opts
    return options
