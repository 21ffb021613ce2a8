"""The operator's job policy: what a job's params may choose, and errors that name the setting."""

from __future__ import annotations

from typing import Any

import pytest

from imagen.config import Settings, load_settings
from imagen.errors import ConfigError, InvalidRequest
from imagen.job_policy import DEFAULT_MAX_PIXELS, JobPolicy, check_generation
from imagen.params import KNOWN, GenerateSpec, spec_from_params


def policy(**fields: Any) -> JobPolicy:
    return JobPolicy.from_settings(Settings(_env_file=None, **fields))  # type: ignore[call-arg]


def refused(params: dict[str, Any], **fields: Any) -> str:
    with pytest.raises(InvalidRequest) as caught:
        spec_from_params("a cat", params, policy(**fields))
    return str(caught.value)


class Backend:
    def __init__(self, name: str, sizes: Any = None) -> None:
        self.name = name
        self._sizes = sizes

    def default_model(self) -> str:
        return f"{self.name}-default"

    def allowed_sizes(self, model: str) -> Any:
        return self._sizes


@pytest.mark.parametrize(
    "params", [{"delay_ms": 600_000}, {"fail": "transient"}, {"backend": "mock", "delay_ms": 1}]
)
def test_test_options_are_refused_by_default_naming_the_setting(params: dict[str, Any]) -> None:
    text = refused(params)
    assert "test options, off on this server" in text and "IMAGEN_JOB_TEST_OPTIONS=true" in text


def test_test_options_pass_when_the_operator_turns_them_on() -> None:
    spec = spec_from_params("a cat", {"delay_ms": 5, "fail": "permanent"}, policy(job_test_options=True))
    assert spec.options == {"delay_ms": 5, "fail": "permanent"}


def test_unknown_key_error_lists_only_what_the_policy_allows() -> None:
    text = refused({"sise": "512x512"})
    allowed = text.split("allowed: ")[1]
    assert "delay_ms" not in allowed and "fail" not in allowed and "size" in allowed
    shown = refused({"sise": "512x512"}, job_test_options=True).split("allowed: ")[1]
    assert shown == ", ".join(KNOWN)


def test_only_the_configured_backend_by_default() -> None:
    text = refused({"backend": "openai"})
    assert text == (
        "backend 'openai' is not offered for jobs on this server; jobs may use: mock"
        " (the operator can add it to IMAGEN_JOB_BACKENDS)"
    )
    assert refused({"backend": "nope"}) == "unknown backend 'nope'; jobs may use: mock"
    assert policy(backend="openai").backends == ("openai",)


def test_job_backends_lists_what_jobs_may_name() -> None:
    allowed = policy(job_backends="mock, google")
    assert allowed.backends == ("mock", "gemini")
    assert spec_from_params("a cat", {"backend": "Google"}, allowed).backend == "gemini"
    assert "jobs may use: mock, gemini" in refused({"backend": "openai"}, job_backends="mock,gemini")


def test_an_unknown_backend_in_the_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="IMAGEN_JOB_BACKENDS: unknown backend 'dall-e'"):
        policy(job_backends="mock,dall-e")


def test_billed_models_are_only_those_listed_or_configured() -> None:
    openai = Backend("openai")
    default = policy(job_backends="openai")
    check_generation(default, openai, GenerateSpec(prompt="p"))  # no model: the configured one
    check_generation(default, openai, GenerateSpec(prompt="p", model=Settings(_env_file=None).openai_model))  # type: ignore[call-arg]
    with pytest.raises(InvalidRequest) as caught:
        check_generation(default, openai, GenerateSpec(prompt="p", model="gpt-image-1-hd"))
    assert "not offered for openai jobs" in str(caught.value) and "IMAGEN_JOB_OPENAI_MODELS" in str(
        caught.value
    )
    listed = policy(job_backends="openai", job_openai_models="a, b")
    check_generation(listed, openai, GenerateSpec(prompt="p", model="b"))
    check_generation(
        policy(job_backends="openai", job_openai_models="*"), openai, GenerateSpec(prompt="p", model="z")
    )
    # The mock bills nothing: any model name.
    check_generation(policy(), Backend("mock"), GenerateSpec(prompt="p", model="anything"))


def test_openai_quality_is_only_the_operators_by_default_naming_the_setting() -> None:
    """Quality multiplies an OpenAI image's price: a job gets only IMAGEN_OPENAI_QUALITY unless
    the operator lists more in IMAGEN_JOB_OPENAI_QUALITIES."""
    openai = Backend("openai")
    default = policy(job_backends="openai,gemini", openai_quality="low")
    check_generation(default, openai, GenerateSpec(prompt="p"))  # none named: the operator's
    check_generation(default, openai, GenerateSpec(prompt="p", quality="low"))
    with pytest.raises(InvalidRequest) as caught:
        check_generation(default, openai, GenerateSpec(prompt="p", quality="high"))
    assert str(caught.value) == (
        "quality 'high' is not offered for openai jobs on this server; jobs may use: low"
        " (the operator can add it to IMAGEN_JOB_OPENAI_QUALITIES)"
    )
    listed = policy(job_backends="openai", job_openai_qualities="low, medium")
    check_generation(listed, openai, GenerateSpec(prompt="p", quality="medium"))
    with pytest.raises(InvalidRequest, match="jobs may use: low, medium "):
        check_generation(listed, openai, GenerateSpec(prompt="p", quality="max"))
    check_generation(
        policy(job_backends="openai", job_openai_qualities="*"),
        openai,
        GenerateSpec(prompt="p", quality="max"),
    )
    # Backends that do not bill by quality ignore it: nothing to refuse.
    check_generation(default, Backend("gemini"), GenerateSpec(prompt="p", quality="high"))


def test_a_bad_quality_lists_only_the_allowed_ones_and_a_bad_setting_is_a_config_error() -> None:
    text = refused({"quality": "ultra"}, openai_quality="medium")
    assert text == "params.quality must be one of medium, not 'ultra'"
    with pytest.raises(ConfigError, match="IMAGEN_JOB_OPENAI_QUALITIES: unknown quality 'hi'"):
        policy(job_openai_qualities="low,hi")


def test_a_size_over_max_pixels_is_refused_naming_the_setting() -> None:
    mock = Backend("mock")
    check_generation(policy(), mock, GenerateSpec(prompt="p", size=(3840, 2160)))
    with pytest.raises(InvalidRequest) as caught:
        check_generation(policy(), mock, GenerateSpec(prompt="p", size=(4096, 4096)))
    assert str(caught.value) == (
        f"size 4096x4096 is 16777216 pixels, more than this server allows for a job ({DEFAULT_MAX_PIXELS};"
        " the operator can raise IMAGEN_MAX_PIXELS)"
    )
    with pytest.raises(InvalidRequest, match="IMAGEN_MAX_PIXELS"):
        check_generation(policy(max_pixels=512 * 512), mock, GenerateSpec(prompt="p", size=(513, 512)))


def test_the_default_covers_every_size_a_real_provider_makes() -> None:
    for width, height in ((1024, 1024), (1536, 1024), (1024, 1536), (2560, 1440), (3840, 2160), (2160, 3840)):
        assert width * height <= DEFAULT_MAX_PIXELS


def test_a_backend_may_list_its_sizes() -> None:
    fixed = Backend("mock", sizes=((1024, 1024), (1536, 1024)))
    check_generation(policy(), fixed, GenerateSpec(prompt="p", size=(1536, 1024)))
    with pytest.raises(InvalidRequest, match="not one mock makes; allowed: 1024x1024, 1536x1024"):
        check_generation(policy(), fixed, GenerateSpec(prompt="p", size=(1000, 1000)))


def test_provider_timeout_must_be_below_the_generation_time_limit() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, generate_time_limit=60)
    assert str(caught.value) == (
        "bad configuration: IMAGEN_PROVIDER_TIMEOUT (300 s) must be below IMAGEN_GENERATE_TIME_LIMIT (60 s)"
    )
    assert load_settings(_env_file=None, generate_time_limit=60, provider_timeout=50).provider_timeout == 50
