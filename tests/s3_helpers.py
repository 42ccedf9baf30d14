"""S3 helpers the tests share (the moto server and the environment are conftest fixtures)."""

from __future__ import annotations

from typing import Any

import boto3


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for moto's server at `endpoint`."""

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
