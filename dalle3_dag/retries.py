"""Retries for transient failures only: an S3, MLflow or network hiccup reruns the step after
an exponential backoff (a trainer resumes from its checkpoint); a failed check, bad config or
a bug fails at once."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

RETRIES = 3
BACKOFF_S = 15.0  # the first wait; doubled at each retry
# What S3-compatible servers answer when they are briefly overloaded or restarting.
TRANSIENT_S3_CODES = {
    "InternalError", "RequestTimeout", "ServiceUnavailable", "SlowDown", "Throttling",
}  # fmt: skip


def _transient_types() -> tuple[type[BaseException], ...]:
    import botocore.exceptions
    import requests.exceptions

    return (
        ConnectionError,
        TimeoutError,
        botocore.exceptions.ConnectionError,
        botocore.exceptions.HTTPClientError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    )


def is_transient(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from (MLflow wraps the requests error), is a
    lost connection, a timeout, or an S3 server's 5xx-style refusal."""
    import botocore.exceptions

    types, seen = _transient_types(), set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, types):
            return True
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        if isinstance(err, botocore.exceptions.ClientError) and code in TRANSIENT_S3_CODES:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def retried_if_transient(context: dg.AssetExecutionContext) -> Iterator[None]:
    """Turn a transient failure of the step into a Dagster retry with exponential backoff."""
    try:
        yield
    except Exception as err:
        if not is_transient(err):
            raise
        attempt = context.retry_number
        wait = BACKOFF_S * 2**attempt
        context.log.warning(
            f"transient failure ({type(err).__name__}: {err}); "
            f"retry {attempt + 1} of {RETRIES} in {wait:.0f} s"
        )
        raise dg.RetryRequested(max_retries=RETRIES, seconds_to_wait=wait) from err
