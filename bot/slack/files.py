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
    insecure_ok = urlsplit(api_url).scheme == "http"  # a local test server
    session = session or requests.Session()
    response = None
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if (parts.hostname or "").lower() not in hosts or (parts.scheme != "https" and not insecure_ok):
                raise DownloadError(f"{name} is not on Slack's file servers ({parts.hostname}); it was not downloaded.")
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


def _chunks(response: requests.Response) -> Iterator[bytes]:
    yield from response.iter_content(64 * 1024)
