"""Whether this process can clip YouTube: yt-dlp's JavaScript runtime, its challenge solver
scripts (``yt-dlp-ejs``), the cookies file and the PO-token plugin, each with what was found.

Since late 2025 YouTube hands yt-dlp its formats only after JavaScript challenges are solved:
without a runtime yt-dlp falls back to one client and some videos fail. These are the checks
behind ``/readyz``, a worker's readiness record and ``hermes-media doctor``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import yt_dlp
from yt_dlp.dependencies import yt_dlp_ejs as ejs
from yt_dlp.extractor.youtube.jsc._builtin import vendor
from yt_dlp.globals import supported_js_runtimes
from yt_dlp.utils import version_tuple

from services.clip.fetch.ytdlp_cli import js_runtimes
from services.clip.settings import ClipSettings

logger = logging.getLogger(__name__)
RECHECK_SECONDS = 5.0
YT_DLP_VERSION: str = yt_dlp.version.__version__
POT_PLUGIN = "bgutil-ytdlp-pot-provider"
POT_PLUGIN_MODULE = "yt_dlp_plugins.extractor.getpot_bgutil_http"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def youtube_toolchain(settings: ClipSettings) -> list[Check]:
    """Blocking (runs the runtime's ``--version``): every check, passing or not."""
    checks = [js_runtime(settings.ytdlp_js_runtime), challenge_solver()]
    if settings.ytdlp_cookie_file:
        checks.append(cookies(settings.ytdlp_cookie_file))
    if settings.ytdlp_pot_provider_url:
        checks.append(pot_plugin())
    return checks


def js_runtime(setting: str) -> Check:
    """The first runtime of the setting that yt-dlp would use: found, and new enough."""
    problems = []
    for name, config in js_runtimes(setting).items():
        runtime = supported_js_runtimes.value[name]
        minimum = ".".join(map(str, runtime.MIN_SUPPORTED_VERSION))
        where = config.get("path") or "this environment's scripts folder or PATH"
        info = runtime(path=config.get("path")).info
        if info is None:
            problems.append(f"{name} not found in {where}")
        elif not info.supported:
            problems.append(f"{name} {info.version} at {info.path} is older than {minimum}")
        else:
            path = shutil.which(info.path) or info.path
            return Check("js_runtime", True, f"{name} {info.version} at {path} (needs {minimum}+)")
    return Check("js_runtime", False, "; ".join(problems) + " (yt-dlp cannot solve challenges)")


def challenge_solver() -> Check:
    """``yt-dlp-ejs`` importable, with the very scripts this yt-dlp accepts (it checks hashes)."""
    expected = vendor.VERSION
    if ejs is None:
        return Check("yt_dlp_ejs", False, f"not installed; yt-dlp expects {expected}")
    version = str(ejs.version)
    solver = importlib.import_module("yt_dlp_ejs.yt.solver")
    if version_tuple(version, lenient=True)[:2] != version_tuple(expected, lenient=True)[:2]:
        return Check("yt_dlp_ejs", False, f"{version} installed; yt-dlp expects {expected}")
    scripts = {"yt.solver.core.min.js": solver.core(), "yt.solver.lib.min.js": solver.lib()}
    for name, code in scripts.items():
        if hashlib.sha3_512(code.encode()).hexdigest() != vendor.HASHES[name]:
            return Check("yt_dlp_ejs", False, f"{version}: {name} is not the one yt-dlp expects")
    return Check("yt_dlp_ejs", True, f"{version} (yt-dlp expects {expected})")


def cookies(path: str) -> Check:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        return Check("cookies", False, f"{path} is not a readable file")
    return Check("cookies", True, f"{path} readable")


def pot_plugin() -> Check:
    """The plugin is installed where yt-dlp loads plugins from."""
    try:
        version = importlib.metadata.version(POT_PLUGIN)
        found = importlib.util.find_spec(POT_PLUGIN_MODULE) is not None
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
        found = False
    if not found:
        return Check("pot_plugin", False, "not installed: pip install 'hermes-media[pot]'")
    return Check("pot_plugin", True, f"{POT_PLUGIN} {version}")


@dataclass
class ToolchainStatus:
    """The checks as of start-up; while one fails they run again, at most every few seconds,
    so readiness turns true once the operator fixes the cause."""

    settings: ClipSettings
    checks: list[Check] = field(default_factory=list)
    _checked_at: float = -math.inf

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    async def current(self) -> list[Check]:
        stale = time.monotonic() - self._checked_at >= RECHECK_SECONDS
        if not self.checks or (not self.ok and stale):
            self.checks = await asyncio.to_thread(youtube_toolchain, self.settings)
            self._checked_at = time.monotonic()
            for check in self.checks:
                if not check.ok:
                    logger.warning("YouTube toolchain: %s: %s", check.name, check.detail)
        return self.checks
