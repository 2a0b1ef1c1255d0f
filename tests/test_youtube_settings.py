"""Operators steer yt-dlp without a release: extractor arguments in yt-dlp's own syntax, the
JavaScript runtime, and a PO-token provider, as yt-dlp itself then reads them."""

from __future__ import annotations

import pydantic
import pytest
import yt_dlp

from services.clip.fetch.source import ydl_options
from services.clip.request import parse_source
from services.clip.settings import ClipSettings

SOURCE = parse_source("https://youtu.be/dQw4w9WgXcQ", frozenset())


def youtube_ie(settings: ClipSettings) -> tuple[yt_dlp.YoutubeDL, object]:
    ydl = yt_dlp.YoutubeDL(ydl_options(SOURCE, settings, None))
    return ydl, ydl.get_info_extractor("Youtube")


def test_extractor_args_from_the_environment_reach_the_youtube_extractor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "HERMES_YTDLP_EXTRACTOR_ARGS",
        "youtube:player_client=default,mweb;skip=dash youtubetab:approximate_date",
    )
    ydl, ie = youtube_ie(ClipSettings())
    with ydl:
        assert ie._configuration_arg("player_client") == ["default", "mweb"]  # type: ignore[attr-defined]
        assert ie._configuration_arg("skip") == ["dash"]  # type: ignore[attr-defined]
        assert ydl.params["extractor_args"]["youtubetab"] == {"approximate_date": [""]}


def test_po_token_provider_url_becomes_the_plugins_extractor_arg() -> None:
    settings = ClipSettings(ytdlp_pot_provider_url="http://pot-provider:4416")
    ydl, ie = youtube_ie(settings)
    with ydl:
        found = ie._configuration_arg("base_url", ie_key="youtubepot-bgutilhttp", casesense=True)  # type: ignore[attr-defined]
    assert found == ["http://pot-provider:4416"]


def test_explicit_extractor_args_win_over_the_provider_setting() -> None:
    settings = ClipSettings(
        ytdlp_pot_provider_url="http://a:4416",
        ytdlp_extractor_args="youtubepot-bgutilhttp:base_url=http://b:4416",
    )
    options = ydl_options(SOURCE, settings, None)
    assert options["extractor_args"] == {"youtubepot-bgutilhttp": {"base_url": ["http://b:4416"]}}


def test_no_extractor_args_by_default() -> None:
    assert "extractor_args" not in ydl_options(SOURCE, ClipSettings(), None)


@pytest.mark.parametrize(
    ("setting", "runtime", "path"),
    [("deno", "deno", None), ("deno:/opt/deno/bin/deno", "deno", "/opt/deno/bin/deno"),
     ("node:/usr/local/bin", "node", "/usr/local/bin")],
)  # fmt: skip
def test_js_runtime_setting_is_what_yt_dlp_runs(setting: str, runtime: str, path: str) -> None:
    ydl = yt_dlp.YoutubeDL(ydl_options(SOURCE, ClipSettings(ytdlp_js_runtime=setting), None))
    with ydl:
        assert list(ydl._js_runtimes) == [runtime]
        assert ydl._js_runtimes[runtime]._path == path


@pytest.mark.parametrize(
    ("field", "value"),
    [("ytdlp_extractor_args", "player_client=mweb"), ("ytdlp_js_runtime", "perl"),
     ("ytdlp_js_runtime", "")],
)  # fmt: skip
def test_settings_yt_dlp_would_not_understand_are_refused_at_start(field: str, value: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        ClipSettings.model_validate({field: value})


@pytest.mark.parametrize(
    ("field", "at_limit", "past_it"),
    [("youtube_cooldown_seconds", 0, -1), ("ytdlp_extraction_cache_seconds", 0, -0.5),
     ("clip_canary_interval_seconds", 0.001, 0)],
)  # fmt: skip
def test_limits_at_and_past_their_bounds(field: str, at_limit: float, past_it: float) -> None:
    assert getattr(ClipSettings.model_validate({field: at_limit}), field) == at_limit
    with pytest.raises(pydantic.ValidationError):
        ClipSettings.model_validate({field: past_it})
