"""HTTP client for the teacher gateway's ``POST /v1/predict``.

Failures map to two errors: ``TeacherUnavailable`` when the teacher cannot answer now
(connection refused, timeout, HTTP 5xx, a response that is not the documented JSON) and
``TeacherRejected`` when the gateway refuses this request (HTTP 4xx), which a retry will not fix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_runtime.errors import TeacherRejected, TeacherUnavailable

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 1.0  # seconds
DEFAULT_READ_TIMEOUT = 2.0  # seconds
MAX_RESPONSE_BYTES = 64 * 1024  # a reply larger than this is treated as a failed teacher


@dataclass(frozen=True)
class TeacherAnswer:
    label: str
    request_id: str | None
    model_version: str | None


class TeacherClient:
    """Blocking client for one gateway; reuses one connection pool across calls."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ):
        self.base_url = base_url.rstrip("/")
        self._headers = {"User-Agent": "edge-runtime"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._client: httpx.Client | None = None

    @property
    def _http(self) -> httpx.Client:
        # httpx is imported and the pool created on the first request, so a device whose first
        # answers are local does not pay for them at start-up.
        if self._client is None:
            import socket

            import httpx

            timeout = httpx.Timeout(self._read_timeout, connect=self._connect_timeout)
            # httpcore writes the headers and the body of a POST separately. With Nagle's
            # algorithm on, the body then waits for the server's delayed ACK (about 40 ms on
            # Linux), so Nagle is turned off.
            transport = httpx.HTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            )
            self._client = httpx.Client(base_url=self.base_url, headers=self._headers,
                                        timeout=timeout, transport=transport)
        return self._client

    def __repr__(self) -> str:  # the API key stays out of reprs and logs
        return f"TeacherClient(base_url={self.base_url!r})"

    def predict(self, text: str) -> TeacherAnswer:
        import httpx

        # httpx applies the read timeout to each read, so a server that sends one byte at a time
        # could hold a query for long. The body must therefore also arrive by this deadline.
        # NOTE: headers sent slowly are still bounded only by the per-read timeout.
        deadline = time.monotonic() + self._connect_timeout + self._read_timeout
        try:
            with self._http.stream("POST", "/v1/predict", json={"text": text}) as response:
                content = bytearray()
                for chunk in response.iter_bytes():
                    content += chunk
                    if time.monotonic() > deadline:
                        raise TeacherUnavailable(
                            f"teacher at {self.base_url} did not finish its reply within "
                            f"{self._connect_timeout + self._read_timeout:.1f} s"
                        )
                    if len(content) > MAX_RESPONSE_BYTES:
                        raise TeacherUnavailable(
                            f"teacher at {self.base_url} sent more than {MAX_RESPONSE_BYTES} "
                            "bytes; a prediction is a few hundred"
                        )
        except httpx.TimeoutException as exc:
            raise TeacherUnavailable(f"teacher at {self.base_url} timed out: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise TeacherUnavailable(f"teacher at {self.base_url} is unreachable: {exc!r}") from exc
        response = httpx.Response(response.status_code, headers=response.headers,
                                  content=bytes(content))

        if response.status_code >= 500:
            raise TeacherUnavailable(
                f"teacher at {self.base_url} returned HTTP {response.status_code}"
            )
        if response.status_code >= 400:
            raise TeacherRejected(response.status_code, _problem_detail(response))
        if response.status_code != 200:
            raise TeacherUnavailable(
                f"teacher at {self.base_url} returned HTTP {response.status_code}; expected 200"
            )
        try:
            body = response.json()
            label = body["label"]
        except (ValueError, KeyError, TypeError):
            raise TeacherUnavailable(
                f"teacher at {self.base_url} returned a body without a 'label' field"
            ) from None
        if not isinstance(label, str):
            raise TeacherUnavailable(f"teacher at {self.base_url} returned a non-string label")
        return TeacherAnswer(
            label=label,
            request_id=body.get("request_id"),
            model_version=body.get("model_version"),
        )

    def healthy(self) -> bool:
        import httpx

        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _problem_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:200]
    return str(body)[:200]
