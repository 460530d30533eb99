"""The signing helper: a process of its own that turns an object-store key into a presigned GET URL.

Run as `python -m tarfuse.sources.signer`, started by objects.Signer. It is the only code in tarfuse that
imports obstore, and it never forks: obstore's runtime does not survive a fork (a child forked after any
obstore request hangs, whatever store it makes next), and the daemon forks to detach and again for each
worker. Here obstore does what it is good at, each cloud's credential chain (environment, web identity,
instance metadata, application default credentials, managed identity, the Azure CLI, SAS) and the
signature; the bytes themselves travel through the same HTTP client, checks and deadlines as an https://
archive (http/archive.py).

The protocol is JSON lines: the first line from the parent says which store ({"scheme", "bucket",
"endpoint", "region", "anonymous", "timeout"}); every later line is {"key", "seconds"} and is answered
with {"url", "expires"} or {"error"}, a message of one line. Secrets never appear in argv: the
credentials come from the environment or the cloud's own files, as the cloud's CLI would find them.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

_MESSAGE_LIMIT = 300  # characters of an obstore error kept for the user: its first line, which says what


def main() -> int:
    config = json.loads(sys.stdin.readline() or "{}")
    try:
        store = _store(config)
        error = None
    except Exception as exc:  # said for every request: the parent asks, and reports the first answer
        store, error = None, _one_line(exc)
    for line in sys.stdin:
        request = json.loads(line)
        if store is None:
            answer: dict[str, Any] = {"error": error}
        elif config.get("anonymous"):
            answer = _unsigned(store, config, request["key"])
        elif config["scheme"] == "az" and (sas := _sas_token()):
            answer = _with_sas(store, config, request["key"], sas)
        else:
            answer = _sign(store, request["key"], int(request["seconds"]))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


def _sign(store: Any, key: str, seconds: int) -> dict[str, Any]:
    import obstore

    try:
        url = obstore.sign(store, "GET", key, datetime.timedelta(seconds=seconds))
    except Exception as exc:
        return {"error": _one_line(exc)}
    return {"url": url, "expires": time.time() + seconds}


def _unsigned(store: Any, config: dict[str, Any], key: str) -> dict[str, Any]:
    """A public object's plain URL, which never expires.

    S3: the URL obstore addresses (path or virtual-hosted style, the region's host), signed with a
    made-up key that is then cut off; obstore signs nothing without credentials. GCS and Azure: the
    documented form, on the endpoint if one is given.
    """
    scheme, bucket, endpoint = config["scheme"], config["bucket"], config.get("endpoint")
    if scheme == "s3":
        answer = _sign(store, key, 60)
        if "url" in answer:
            answer = {"url": answer["url"].partition("?")[0], "expires": None}
        return answer
    if scheme == "gs":
        base = endpoint or "https://storage.googleapis.com"
    elif endpoint:
        base = endpoint
    elif account := os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get("AZURE_STORAGE_ACCOUNT"):
        base = f"https://{account}.blob.core.windows.net"
    else:
        return {
            "error": "an anonymous az:// URL needs the account: AZURE_STORAGE_ACCOUNT_NAME or -o endpoint="
        }
    return {"url": f"{base.rstrip('/')}/{bucket}/{quote(key, safe='/')}", "expires": None}


def _sas_token() -> str | None:
    """An Azure SAS given in the environment (object_store's names): a signature made beforehand."""
    found = os.environ.get("AZURE_STORAGE_SAS_KEY") or os.environ.get("AZURE_STORAGE_SAS_TOKEN")
    return found.lstrip("?") if found else None


def _with_sas(store: Any, config: dict[str, Any], key: str, sas: str) -> dict[str, Any]:
    """The blob's URL with the SAS given: object_store signs nothing with a SAS (it makes SAS from keys),
    and the SAS is the signature. Its expiry (`se=`) is the SAS's own: a refusal once it has passed is
    the one line any refusal is."""
    answer = _unsigned(store, config, key)
    if "url" in answer:
        answer["url"] += "?" + sas
    return answer


def _store(config: dict[str, Any]) -> Any:
    """The store of the bucket (container), from the environment and the -o options given."""
    from obstore.store import AzureStore, GCSStore, S3Store

    scheme, bucket = config["scheme"], config["bucket"]
    endpoint, region = config.get("endpoint"), config.get("region")
    timeout = f"{max(int(config.get('timeout') or 20), 1)}s"
    options: dict[str, Any] = {"timeout": timeout, "connect_timeout": timeout}
    given_endpoint = endpoint or (os.environ.get("AWS_ENDPOINT_URL") if scheme == "s3" else None)
    if given_endpoint and given_endpoint.lower().startswith("http://"):
        options["allow_http"] = True  # an http:// endpoint given explicitly is used as given
    settings: dict[str, Any] = {"client_options": options}
    if scheme == "s3" and config.get("anonymous"):  # only to address the object (_unsigned)
        settings.update(access_key_id="anonymous", secret_access_key="anonymous", skip_signature=True)
    if scheme == "s3":
        if endpoint:
            settings["endpoint"] = endpoint
        if region:
            settings["region"] = region
        if os.environ.get("AWS_PROFILE") and not config.get("anonymous"):
            settings["credential_provider"] = _profile_provider(os.environ["AWS_PROFILE"])
        return S3Store(bucket, **settings)
    if scheme == "gs":
        if endpoint:
            settings["base_url"] = endpoint
        return GCSStore(bucket, **settings)
    if endpoint:
        settings["endpoint"] = endpoint
    return AzureStore(bucket, **settings)


def _profile_provider(profile: str) -> Any:
    """AWS profiles (~/.aws/config and credentials, SSO, assume-role) are boto3's, not object_store's."""
    try:
        import boto3  # type: ignore[import-untyped]
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise RuntimeError(
            f"AWS_PROFILE={profile} needs boto3, which reads AWS profiles (pip install boto3 into tarfuse's "
            "environment), or credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    return Boto3CredentialProvider(boto3.Session(profile_name=profile))


def _one_line(exc: BaseException) -> str:
    """obstore's message without its debug dump: the first line, which says what went wrong."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:_MESSAGE_LIMIT]


if __name__ == "__main__":
    sys.exit(main())
