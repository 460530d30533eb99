"""A hostile web server (tests/kit/httpserver.py) against sources/http/: what it sends is read only as far as
it agrees with what was asked, its redirects take no secret elsewhere, and no answer, however slow, keeps a
read waiting without end.

Everything talks to loopback addresses only: "another host" is another port, another 127.x address or
another name for 127.0.0.1. Timeouts are a fraction of a second, so that the slow cases stay fast.
"""

import base64
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.httpserver import RangeServer, serve
from kit.mounts import run_tarfuse_measuring_peak_rss

from tarfuse.errors import ArchiveError, RemoteError, UsageError
from tarfuse.sources.blockcache import BLOCK_SIZE, BlockCache
from tarfuse.sources.http.archive import RemoteArchive
from tarfuse.sources.http.options import RemoteOptions, parse_options

pytestmark = pytest.mark.usefixtures("no_proxy_from_outside")

MiB = 1 << 20
SECRET_HEADERS = (("Authorization", "Bearer s3cretTOKEN"), ("X-Api-Key", "k3ySECRET"))
RSS_CEILING = 256 * MiB  # the memory ceiling: peak RSS under 256 MiB at any point of a mount's life


@pytest.fixture
def other_server() -> Iterator[RangeServer]:
    """Another host: a server on 127.0.0.2 (the whole of 127.0.0.0/8 is loopback on Linux)."""
    with serve(host="127.0.0.2") as running:
        yield running


@pytest.fixture(scope="module")
def blob() -> bytes:
    return random.Random(11).randbytes(2 * MiB + 777)


@pytest.fixture(scope="module")
def gib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 GiB of zeros that take no disk space: what a lying server has to send from."""
    path = tmp_path_factory.mktemp("big") / "zeros.bin"
    with path.open("wb") as file:
        file.truncate(1 << 30)
    return path


def remote(url: str, **options: object) -> RemoteArchive:
    return RemoteArchive(url, RemoteOptions(**options))  # type: ignore[arg-type]


def settled_bytes_served(server: RangeServer) -> int:
    """The server's count once every handler has returned: it sent all it was going to, or noticed the
    hang-up. A server still sending 64 MiB, or 600, fails the wait rather than pass the bound."""
    server.wait_until_every_request_handled(timeout=30)
    return server.bytes_served


def finishes_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """Run `call` in a thread; fail the test if it is still running after `seconds`, else return what it
    raised. A thread, so that the code before the fix fails the test instead of hanging it."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return raised[0] if raised else None


# --- answers longer than asked ---------------------------------------------------------------------


def test_first_answer_claiming_more_than_asked_is_refused_before_its_body(
    server: RangeServer, gib_file: Path
) -> None:
    url = server.put("vm.tar", gib_file)
    server.faults.claim = 64 * MiB  # "bytes 0-67108863/1073741824" to "bytes=0-262143"
    with pytest.raises(RemoteError, match=r"asked for bytes 0-262143.*0-67108863/1073741824"):
        remote(url)
    assert settled_bytes_served(server) < 16 * MiB  # what socket buffers took before the hang-up


def test_body_longer_than_its_content_range_is_refused(server: RangeServer, blob: bytes) -> None:
    url = server.put("blob", blob)
    server.faults.body_extra = MiB
    with pytest.raises(RemoteError, match=r"body for 262144 bytes \(Content-Length\)"):
        remote(url)


def test_later_body_longer_than_its_content_range_is_refused(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), retries=0)
    server.faults.body_extra = 10
    with pytest.raises(RemoteError, match=rf"Content-Length.* at archive offset {MiB}"):
        source.read_at(MiB, 100)


@pytest.mark.parametrize(
    "content_range",
    ["bytes 0-131071/+3000000", "bytes 0-131071/3_000_000", "bytes 0 - 131071/3000000"],
)
def test_content_range_that_is_not_plain_digits_is_refused(
    server: RangeServer, blob: bytes, content_range: str
) -> None:
    # int() takes "+5", "1_0" and spaces around a number; RFC 9110, 14.4, allows digits only.
    server.faults.content_range = content_range
    with pytest.raises(RemoteError, match="no usable Content-Range"):
        remote(server.put("blob", blob))


def test_list_of_a_server_claiming_600_mib_stays_under_the_memory_ceiling(
    server: RangeServer, gib_file: Path, tmp_path: Path
) -> None:
    # "bytes 0-629145599/..." with 600 MiB of body made --list peak at 1.2 GiB: the body has a bound.
    url = server.put("vm.tar", gib_file)
    server.faults.claim = 600 * MiB
    result, peak = run_tarfuse_measuring_peak_rss("--list", url, scratch=tmp_path)
    status, output = result.returncode, result.stdout + result.stderr
    assert status == 1, output
    assert f"GET {url}: asked for bytes 0-262143, the server answered with 0-629145599/" in output
    assert "Traceback" not in output
    assert peak < RSS_CEILING, f"peak RSS {peak / MiB:.0f} MiB"
    assert settled_bytes_served(server) < 16 * MiB  # what socket buffers took before the hang-up


def test_fetch_that_yields_more_than_asked_is_refused_at_once() -> None:
    asked: list[int] = []

    def endless(offset: int, size: int) -> Iterator[bytes]:
        asked.append(size)
        for _ in range(1000):  # 1000 MiB if nobody stops it
            yield bytes(MiB)

    cache = BlockCache(endless, 8 * BLOCK_SIZE, cache_bytes=0)
    with pytest.raises(ArchiveError, match=r"more than the 131072 bytes asked at archive offset 0"):
        cache.read_at(0, 10)
    assert asked == [BLOCK_SIZE]


# --- redirects -------------------------------------------------------------------------------------


@pytest.fixture(params=["port", "address", "name"])
def elsewhere(request: pytest.FixtureRequest, server: RangeServer) -> Iterator[tuple[str, RangeServer]]:
    """Another origin than `server`'s, and the server behind it: another port on 127.0.0.1, another
    loopback address, or the same server under another name (localhost)."""
    if request.param == "name":
        yield server.base.replace("127.0.0.1", "localhost"), server
        return
    with serve(host="127.0.0.1" if request.param == "port" else "127.0.0.2") as other:
        yield other.base, other


def test_redirect_to_another_host_is_refused_unless_asked(
    server: RangeServer, elsewhere: tuple[str, RangeServer], blob: bytes
) -> None:
    target, other = elsewhere
    other.put("blob", blob)
    url = server.redirect("vm.tar", f"{target}/blob")
    with pytest.raises(RemoteError, match=rf"redirected to another host, {target}/blob; .*follow_redirects"):
        remote(url, headers=SECRET_HEADERS)
    assert [r.target for r in other.requests] == ([] if other is not server else ["/vm.tar"])


def test_followed_redirect_to_another_host_carries_no_user_header(
    server: RangeServer, elsewhere: tuple[str, RangeServer], blob: bytes
) -> None:
    target, other = elsewhere
    other.put("blob", blob)
    url = server.redirect("vm.tar", f"{target}/blob", status=307)
    source = remote(url, headers=SECRET_HEADERS, follow_redirects=True)
    assert source.read_at(MiB, 1000) == blob[MiB : MiB + 1000]
    at_target = [r for r in other.requests if r.target == "/blob"]
    assert len(at_target) == 2  # the first block at open, then the read
    for request in at_target:
        assert "X-Api-Key" not in request.headers
        assert "Authorization" not in request.headers
    first = [r for r in server.requests if r.target == "/vm.tar"]
    assert len(first) == 2
    assert {r.headers["X-Api-Key"] for r in first} == {"k3ySECRET"}  # the URL's own server gets them


def test_user_headers_stay_dropped_when_a_redirect_chain_comes_back(
    server: RangeServer, other_server: RangeServer, blob: bytes
) -> None:
    # The other host chose where to send us back: nothing given for the URL's server goes with it.
    server.put("blob", blob)
    other_server.redirect("bounce", server.url("blob"))
    url = server.redirect("vm.tar", other_server.url("bounce"))
    source = remote(url, headers=SECRET_HEADERS, follow_redirects=True)
    assert source.read_at(0, 10) == blob[:10]
    for request in [*other_server.requests, *(r for r in server.requests if r.target == "/blob")]:
        assert "X-Api-Key" not in request.headers
        assert "Authorization" not in request.headers


def test_redirect_from_https_to_http_is_refused(
    tls_files: tuple[Path, Path],
    server: RangeServer,
    blob: bytes,
) -> None:
    server.put("blob", blob)
    with serve(tls=tls_files) as https:
        url = https.redirect("vm.tar", server.url("blob"))
        with pytest.raises(RemoteError, match=r"from https to plain http"):
            remote(url, ca_file=str(tls_files[0]), headers=SECRET_HEADERS, follow_redirects=True)
    assert server.requests == []


def test_same_origin_redirect_keeps_the_headers(server: RangeServer, blob: bytes) -> None:
    # Passed before the fix too (urllib3 followed it): a guard for tarfuse's own redirect handling.
    server.put("v2/blob", blob)
    url = server.redirect("latest", "/v2/blob", status=301)
    source = remote(url, headers=SECRET_HEADERS)
    assert source.read_at(MiB, 10) == blob[MiB : MiB + 10]
    assert {r.headers.get("X-Api-Key") for r in server.requests} == {"k3ySECRET"}


def test_follow_redirects_is_a_word_without_value() -> None:
    assert parse_options(["follow_redirects"]).follow_redirects
    assert not parse_options([]).follow_redirects
    with pytest.raises(UsageError, match="takes no value"):
        parse_options(["follow_redirects=yes"])


# --- slow servers ----------------------------------------------------------------------------------


def test_dripping_body_fails_after_the_deadline(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), timeout=0.3, retries=3)
    server.faults.drip = 0.05  # a byte well within every socket timeout: only a deadline ends it
    started = time.monotonic()
    raised = finishes_within(15, lambda: source.read_at(MiB, 100))
    assert isinstance(raised, RemoteError), raised
    assert "/blob: no complete answer within 0.6 s (twice timeout=) at archive offset" in str(raised)
    assert MiB <= (raised.offset or 0) < MiB + 100  # the first byte that did not come
    assert time.monotonic() - started < 5


def test_dripping_headers_fail_after_the_deadline(server: RangeServer, blob: bytes) -> None:
    url = server.put("blob", blob)
    server.faults.drip, server.faults.drip_headers = 0.05, True
    raised = finishes_within(15, lambda: remote(url, timeout=0.3))
    assert isinstance(raised, RemoteError), raised
    assert "no complete answer within 0.6 s" in str(raised)


def test_dripping_https_fails_after_the_deadline(
    tls_files: tuple[Path, Path],
    blob: bytes,
) -> None:
    with serve(tls=tls_files) as https:
        source = remote(https.put("blob", blob), ca_file=str(tls_files[0]), timeout=0.3)
        https.faults.drip = 0.05
        raised = finishes_within(15, lambda: source.read_at(MiB, 100))
    assert isinstance(raised, RemoteError), raised
    assert "no complete answer within 0.6 s" in str(raised)


def test_slow_but_steady_answer_is_resumed_past_the_deadline(server: RangeServer, blob: bytes) -> None:
    # Passed before the fix too: a guard that the deadline cuts stalls, not slow transfers that move.
    source = remote(server.put("blob", blob), timeout=0.3, retries=0)
    server.reset_counters()
    server.faults.pace = 0.05  # 64 KiB every 50 ms: 1 MiB takes 0.8 s, more than the 0.6 s deadline
    assert source.read_at(MiB // 2, MiB) == blob[MiB // 2 : MiB // 2 + MiB]
    assert len(server.requests) >= 2  # cut off once at least, and resumed where it stopped


def test_user_info_in_the_url_is_sent_as_basic_auth_to_that_server_only(
    server: RangeServer, elsewhere: tuple[str, RangeServer], blob: bytes
) -> None:
    """urllib3 sent nothing for `user:password@`, and the server's 401 did not say why."""
    target, other = elsewhere
    other.put("blob", blob)
    url = server.redirect("vm.tar", f"{target}/blob", status=307)
    with_user = url.replace("://", "://alice:s%40cret@", 1)
    source = remote(with_user, follow_redirects=True)
    assert source.read_at(0, 10) == blob[:10]
    first = [r for r in server.requests if r.target == "/vm.tar"]
    assert {r.headers.get("Authorization") for r in first} == {
        "Basic " + base64.b64encode(b"alice:s@cret").decode()
    }
    assert all("Authorization" not in r.headers for r in other.requests if r.target == "/blob")
    assert "alice" not in source.path
