"""Fetching an uploaded device list from Slack, and from nowhere else.

The file comes from ``url_private_download`` with the bot token. The token is sent only to Slack's
file host or to the host of the configured ``SLACK_API_URL`` (GovSlack, a test server); a redirect
is followed only to such a host, and never more than a few times. The body is streamed into the
device-list reader with a size cap. Slack answers an unauthorised download with HTTP 200 and its
sign-in page: that is recognised and explained, not parsed as names.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.util import parse_url

from bot.names import DEFAULT_MAX_BYTES, DeviceList, DeviceListError, read_device_file

MAX_REDIRECTS = 3


class DownloadError(DeviceListError):
    """The file could not be fetched; the message says why, for the person who uploaded it."""


def allowed_hosts(api_url: str) -> frozenset[str]:
    """Hosts that may receive the bot token for a file: Slack's file host and the API's own."""
    api_host = (urlsplit(api_url).hostname or "").lower()
    hosts = {"files.slack.com", api_host}
    base = api_host.removeprefix("api.").removeprefix("www.")
    if base and "." in base:
        hosts.add(f"files.{base}")  # GovSlack: files.slack-gov.com
    return frozenset(h for h in hosts if h)


def fetch_device_list(
    file: dict,
    *,
    token: str,
    api_url: str,
    session: requests.Session | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
) -> DeviceList:
    """Download and read the device list of a Slack file object."""
    name = str(file.get("name") or "the file")
    if file.get("size") and int(file["size"]) > max_bytes:
        raise DownloadError(f"{name} is {int(file['size']) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB. Split it into smaller files.")
    url = file.get("url_private_download") or file.get("url_private")
    if not url:
        raise DownloadError(f"Slack gave no download address for {name}; upload it again.")
    hosts = allowed_hosts(api_url)
    insecure_ok = urlsplit(api_url).scheme == "http"  # a local test server: http, and its own port
    session = session or requests.Session()
    response = None
    try:
        for _ in range(MAX_REDIRECTS + 1):
            url = checked_url(url, hosts, insecure_ok, name)
            response = session.get(url, headers={"Authorization": f"Bearer {token}"}, stream=True, allow_redirects=False, timeout=timeout)
            if response.is_redirect:
                url = urljoin(url, response.headers.get("Location", ""))
                response.close()
                continue
            break
        else:
            raise DownloadError(f"Slack redirected the download of {name} too many times.")
        if response.status_code != 200:
            raise DownloadError(f"Slack answered HTTP {response.status_code} when downloading {name}; try uploading it again.")
        if "text/html" in response.headers.get("Content-Type", "").lower() and file.get("filetype") not in ("html",):
            raise DownloadError(
                f"Slack sent a web page instead of {name}: the bot could not read the file "
                "(it needs the files:read scope and access to the channel). Ask an admin, or paste the names."
            )
        return read_device_file(_chunks(response), filename=name, max_bytes=max_bytes)
    except requests.RequestException as exc:
        raise DownloadError(f"downloading {name} from Slack failed ({type(exc).__name__}); try again.") from None
    finally:
        if response is not None:
            response.close()


def checked_url(url: str, hosts: frozenset[str], insecure_ok: bool, name: str) -> str:
    """The URL rebuilt from its parts if it may receive the token, else :class:`DownloadError`.

    It is parsed once, with the parser ``requests`` itself uses (urllib3), and the request goes to
    the URL rebuilt from those parts: no second parser can read another host into it. Anything
    ambiguous is refused: credentials in the URL, a backslash, a port other than the scheme's.
    """
    refused = DownloadError(f"{name} is not on Slack's file servers; it was not downloaded.")
    if "\\" in url or any(ord(c) < 33 for c in url):
        raise refused
    try:
        parts = parse_url(url)
    except ValueError:
        raise refused from None
    scheme = (parts.scheme or "").lower()
    host = (parts.host or "").lower().rstrip(".")
    default_port = {"https": 443, "http": 80}.get(scheme)
    if parts.auth or host not in hosts or default_port is None or (scheme == "http" and not insecure_ok):
        raise refused
    if parts.port not in (None, default_port) and not insecure_ok:
        raise refused
    port = f":{parts.port}" if parts.port not in (None, default_port) else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{host}{port}{parts.path or '/'}{query}"


def _chunks(response: requests.Response) -> Iterator[bytes]:
    yield from response.iter_content(64 * 1024)
