"""msal's HTTP client against a real socket: a token endpoint that trickles its answer
cannot hold a request past its deadline, and an ordinary answer is read whole."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from flask_obo.bulkhead import Deadline
from flask_obo.msal_http import EntraUnavailable, MsalHttpClient, form_body, within

BODY = b'{"access_token": "at", "token_type": "Bearer", "expires_in": 3600}'


class _Metadata:
    """No OpenID configuration is asked for here."""

    @staticmethod
    def for_url(url: str) -> None:
        return None


@pytest.fixture
def trickling_server() -> Iterator[str]:
    """Sends the status line and headers at once, then one byte of body every 100 ms."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    done = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(BODY))
            for byte in BODY:
                if done.wait(0.1):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up: what we want

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/token"
    done.set()
    thread.join(timeout=5)
    listener.close()


def test_a_trickling_answer_ends_at_the_deadline(trickling_server: str) -> None:
    url = trickling_server
    client = MsalHttpClient(requests.Session(), _Metadata(), timeout=(1.0, 2.0))  # each read < 2 s

    started = time.monotonic()
    with pytest.raises(EntraUnavailable), within(Deadline(0.6)):
        client.post(url, data={"grant_type": "x"})
    took = time.monotonic() - started

    assert 0.5 <= took < 1.0  # the whole body would take 6.7 s; each byte comes within the read timeout
    assert client.blocked_until > time.monotonic()  # and this user's next calls fail fast


def test_an_ordinary_answer_is_read_whole() -> None:
    with socket.create_server(("127.0.0.1", 0)) as plain:
        def serve() -> None:
            connection, _ = plain.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))

        threading.Thread(target=serve, daemon=True).start()
        client = MsalHttpClient(requests.Session(), _Metadata(), timeout=(1.0, 2.0))
        with within(Deadline(5)):
            response = client.post(f"http://127.0.0.1:{plain.getsockname()[1]}/token", data={})

    assert response.status_code == 200
    assert response.json()["access_token"] == "at"


MSAL_FORM = {  # an On-Behalf-Of form as msal hands it over, with the value kinds it may hold
    "client_id": "00000000-0000-0000-0000-000000000001",
    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "assertion": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln+/=",
    "requested_token_use": "on_behalf_of",
    "scope": "https://graph.microsoft.com/.default offline_access openid profile",
    "client_info": 1,
    "claims": '{"access_token":{"xms_cc":{"values":["CP1"]}}}',
    "login_hint": "zoë@contoso.example & co",
    "resource": ["a b", "c"],
    "client_secret": None,
}


def test_msals_form_is_sent_as_requests_would_encode_it() -> None:
    """The token request's body is encoded before requests sees it (see ``form_body``):
    the bytes on the wire and the Content-Type are what requests makes of msal's dict."""
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as plain:
        def serve() -> None:
            connection, _ = plain.accept()
            with connection:
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                        re.search(rb"(?i)content-length: (\d+)", data).group(1)):  # type: ignore[union-attr]
                    data += connection.recv(65536)
                received.append(data)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))

        threading.Thread(target=serve, daemon=True).start()
        client = MsalHttpClient(requests.Session(), _Metadata(), timeout=(1.0, 2.0))
        url = f"http://127.0.0.1:{plain.getsockname()[1]}/token"
        with within(Deadline(5)):
            assert client.post(url, data=dict(MSAL_FORM), headers={"Accept": "application/json"}).ok

    as_requests_would = requests.Request("POST", url, data=dict(MSAL_FORM)).prepare()
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert body == as_requests_would.body.encode()  # type: ignore[union-attr]
    assert b"\r\ncontent-type: application/x-www-form-urlencoded\r\n" in head.lower() + b"\r\n"
    assert b"client_secret" not in body


def test_a_content_type_msal_sets_is_kept() -> None:
    own = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
    body, headers = form_body({"a": "b"}, own)
    assert (body, headers) == ("a=b", own)
