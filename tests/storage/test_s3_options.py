"""How S3Storage configures botocore: our defaults, and a user's own settings kept."""

from __future__ import annotations

from uploader.storage.s3 import S3Storage


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
