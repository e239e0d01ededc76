"""The bot token goes to Slack's file hosts and nowhere else, however the URL is written."""

import pytest
import requests
from requests.adapters import BaseAdapter

from bot.slack.files import DownloadError, allowed_hosts, checked_url, fetch_device_list

SLACK = "https://slack.com/api/"


class Recorder(BaseAdapter):
    def __init__(self):
        super().__init__()
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.sent.append(request)
        response = requests.Response()
        response.status_code = 200
        response.headers["Content-Type"] = "text/csv"
        response._content = b"dev-0001\ndev-0002\n"
        response._content_consumed = True
        response.raw = None
        return response

    def close(self):
        pass


def session_recording() -> tuple[requests.Session, Recorder]:
    session, recorder = requests.Session(), Recorder()
    session.mount("https://", recorder)
    session.mount("http://", recorder)
    return session, recorder


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example\\@files.slack.com/files-pri/T1-F1/download/d.csv",
        "https://user:pass@files.slack.com/files-pri/T1-F1/download/d.csv",
        "https://files.slack.com@evil.example/d.csv",
        "https://files.slack.com:444/files-pri/T1-F1/download/d.csv",
        "http://files.slack.com/files-pri/T1-F1/download/d.csv",
        "https://files.slack.com.evil.example/d.csv",
        "https://evil.example/files.slack.com/d.csv",
        "ftp://files.slack.com/d.csv",
        "https://files.slack.com\\t.evil/d.csv",
    ],
)
def test_urls_that_could_take_the_token_elsewhere_are_refused_before_any_request(url):
    session, recorder = session_recording()
    with pytest.raises(DownloadError, match="not on Slack's file servers"):
        fetch_device_list({"name": "d.csv", "url_private_download": url}, token="xoxb-secret", api_url=SLACK, session=session)
    assert recorder.sent == []


@pytest.mark.parametrize(
    "url",
    ["https://files.slack.com/files-pri/T1-F1/download/d.csv", "https://FILES.slack.com:443/files-pri/T1-F1/download/d.csv?x=1"],
)
def test_slack_file_urls_are_fetched_with_the_token(url):
    session, recorder = session_recording()
    result = fetch_device_list({"name": "d.csv", "url_private_download": url}, token="xoxb-secret", api_url=SLACK, session=session)
    assert [d.name for d in result.devices] == ["dev-0001", "dev-0002"]
    assert recorder.sent[0].headers["Authorization"] == "Bearer xoxb-secret"
    assert recorder.sent[0].url.startswith("https://files.slack.com/files-pri/")


def test_govslack_and_a_local_api_host_are_their_own_file_hosts():
    assert "files.slack-gov.com" in allowed_hosts("https://slack-gov.com/api/")
    assert checked_url("http://127.0.0.1:8123/files-pri/x", allowed_hosts("http://127.0.0.1:8123/api/"), True, "d") == "http://127.0.0.1:8123/files-pri/x"
