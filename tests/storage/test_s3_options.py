"""How S3Storage configures botocore: our defaults, and a user's own settings kept."""

from __future__ import annotations

import botocore
import pytest

import uploader
from tests.conftest import s3_options
from tests.limited_s3 import limited_s3
from tests.storage.conftest import payload
from uploader.storage.s3 import S3Storage
from uploader.storage.s3_requests import CONTINUE_THRESHOLD, user_agent


def test_defaults_skip_body_hashes_that_content_md5_already_covers() -> None:
    st = S3Storage("s3://bucket/prefix", {"key": "k", "secret": "s"})
    config = st.fs.config_kwargs
    assert config["s3"] == {"payload_signing_enabled": False}
    assert config["request_checksum_calculation"] == "when_required"


def test_a_users_s3_settings_are_merged_not_replaced() -> None:
    st = S3Storage(
        "s3://bucket/prefix",
        {"key": "k", "secret": "s", "config_kwargs": {"s3": {"addressing_style": "path"}}},
    )
    assert st.fs.config_kwargs["s3"] == {
        "addressing_style": "path",
        "payload_signing_enabled": False,
    }
    signed = S3Storage(
        "s3://bucket/prefix",
        {"key": "k", "secret": "s", "config_kwargs": {"s3": {"payload_signing_enabled": True}}},
    )
    assert signed.fs.config_kwargs["s3"] == {"payload_signing_enabled": True}


def test_requests_name_us_and_a_users_agent_settings_win() -> None:
    ours = S3Storage("s3://bucket/prefix", {"key": "k", "secret": "s"})
    assert ours.fs.config_kwargs["user_agent"] == user_agent()
    assert user_agent().startswith(f"segment-uploader/{uploader.__version__} aiobotocore/")
    theirs = S3Storage(
        "s3://bucket/prefix",
        {"key": "k", "secret": "s", "config_kwargs": {"user_agent": "broker/7"}},
    )
    assert theirs.fs.config_kwargs["user_agent"] == "broker/7"
    # An app id lives only in botocore's default string: asking for one keeps that string.
    app = S3Storage(
        "s3://bucket/prefix",
        {"key": "k", "secret": "s", "config_kwargs": {"user_agent_appid": "broker"}},
    )
    assert "user_agent" not in app.fs.config_kwargs


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, f"{user_agent()} botocore/{botocore.__version__}"),
        ({"user_agent_extra": "node-7"}, f"{user_agent()} botocore/{botocore.__version__} node-7"),
        ({"user_agent": "broker/7"}, f"broker/7 botocore/{botocore.__version__}"),
    ],
)
def test_the_user_agent_reaches_the_server(
    moto_endpoint: str, s3_bucket: str, config: dict[str, str], expected: str
) -> None:
    with limited_s3(moto_endpoint) as proxy:
        options = s3_options(proxy.url)
        options["config_kwargs"] = config
        st = S3Storage(f"s3://{s3_bucket}/root", options)
        st.put("k1", payload(b"x" * 10))
        assert st.head("k1") is not None
        agents = set(proxy.agents)
    assert agents == {expected}, agents


def test_an_app_id_reaches_the_server_in_botocores_string(
    moto_endpoint: str, s3_bucket: str
) -> None:
    with limited_s3(moto_endpoint) as proxy:
        options = s3_options(proxy.url)
        options["config_kwargs"] = {"user_agent_appid": "broker-7"}
        S3Storage(f"s3://{s3_bucket}/root", options).put("k2", payload(b"y"))
        agents = set(proxy.agents)
    assert agents
    for agent in agents:  # botocore's string names the features each request used
        assert agent.startswith("aiobotocore/") and "app/broker-7" in agent, agent
        assert "segment-uploader" not in agent


def test_only_bodies_of_512_kib_and_more_ask_the_server_to_continue(
    moto_endpoint: str, s3_bucket: str
) -> None:
    """``Expect: 100-continue`` (botocore's on every body) costs a small PUT a round trip: our
    session's clients send it only for bodies of :data:`CONTINUE_THRESHOLD` bytes and more."""
    big = b"p" * CONTINUE_THRESHOLD
    with limited_s3(moto_endpoint) as proxy:
        st = S3Storage(f"s3://{s3_bucket}/root", s3_options(proxy.url))
        st.put("small", payload(b"s" * (CONTINUE_THRESHOLD - 1)))
        upload = st.start_upload("large")
        part = st.upload_part("large", upload, 1, payload(big))
        st.complete("large", upload, [part])
        sent = list(zip(proxy.calls, proxy.expects, strict=True))
        parts = [
            e
            for op, path, e in zip(proxy.calls, proxy.paths, proxy.expects, strict=True)
            if op == "UploadPart" and path.endswith("/large")
        ]
        info = st.head("large")
    assert info is not None and info.size == len(big)
    puts = [e for op, e in sent if op == "PutObject"]  # the write probe's too
    assert len(puts) >= 2 and set(puts) == {""}, sent
    assert parts == ["100-continue"]  # (the Complete probe's small part goes without)


def test_a_users_own_session_keeps_botocores_expect_header(
    moto_endpoint: str, s3_bucket: str
) -> None:
    from aiobotocore.session import get_session

    with limited_s3(moto_endpoint) as proxy:
        options = {**s3_options(proxy.url), "session": get_session()}
        S3Storage(f"s3://{s3_bucket}/root", options).put("k3", payload(b"z" * 10))
        sent = list(zip(proxy.calls, proxy.expects, strict=True))
    puts = [e for op, e in sent if op == "PutObject"]
    assert len(puts) >= 1 and set(puts) == {"100-continue"}, sent
