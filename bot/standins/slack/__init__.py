r"""A local stand-in for Slack, for the tests and the offline demo.

Two halves, both speaking Slack's wire formats so that the real ``slack_sdk`` and ``slack_bolt`` run
against them unchanged:

* :class:`FakeSlack` is the Slack side the bot calls. It serves the Web API methods the bot uses on
  ``http://127.0.0.1:PORT/api/`` (give ``fake.api_url`` to ``WebClient(base_url=…)``) with Slack's
  response shapes and error codes, and the other addresses Slack hands out: upload URLs
  (``files.getUploadURLExternal``), private file URLs (``url_private_download``, which answer a
  request without the bot token with HTTP 200 and a sign-in page, as Slack does) and
  ``response_url``\s. It keeps a model of the workspace for tests to read (:meth:`~FakeSlack.messages`,
  :meth:`~FakeSlack.thread`, :meth:`~FakeSlack.ephemeral`, :attr:`~FakeSlack.views`,
  :attr:`~FakeSlack.uploads`, :meth:`~FakeSlack.dm`, the Home tabs of ``views.publish``:
  :meth:`~FakeSlack.home`), records every request
  (:attr:`~FakeSlack.calls`), injects faults (:meth:`~FakeSlack.fail`, :meth:`~FakeSlack.delay`),
  holds answers until a test releases them (:meth:`~FakeSlack.hold`) and lets a test wait for the
  bot without sleeping (:meth:`~FakeSlack.wait_for`).
* Socket Mode: ``apps.connections.open`` (with the app-level token, :attr:`FakeSlack.app_token`)
  hands out ``ws://`` URLs of :attr:`FakeSlack.socket_mode`, a local Socket Mode server
  (:mod:`bot.standins.slack.socketmode`) that sends envelopes, collects acks and drops connections
  in every way Slack's can end.
* :class:`Workspace` plays the people: it builds the slash command, ``block_actions``,
  ``view_submission`` and Events API (``event_callback``, e.g. ``app_home_opened``) requests Slack sends, signs them with the signing secret
  (:func:`signature_headers`) and POSTs them to the app. The pure builders (:func:`command_body`,
  :func:`interaction_body`, :func:`block_actions_payload`, :func:`view_submission_payload`) are
  public for unit tests.

Slack's behaviour reproduced here, with the API reference (https://docs.slack.dev/reference/methods/)
as the source: ``not_authed``/``invalid_auth``/``unknown_method`` with HTTP 200; ``ts`` values that
only grow; ``chat.update`` keeping the old blocks when ``blocks`` is omitted; block limits
(``invalid_blocks`` with ``response_metadata.messages``); block and action ids generated where the
bot gave none; a ``trigger_id`` that works once (``exchanged_trigger_id``) and for 3 seconds
(``expired_trigger_id``); ``views.update`` with a stale ``hash`` (``hash_conflict``);
``files_upload_v2``'s three steps (the bytes go to the upload URL raw, or multipart); a
``response_url`` that works 5 times (``used_url``); message ``metadata`` (``event_type`` and
``event_payload``, ``invalid_metadata_format``/``invalid_metadata_schema``), returned by
``conversations.history`` (top-level messages and broadcasts, newest first) and
``conversations.replies`` (the parent, then the replies oldest first) only with
``include_all_metadata``, both cursor-paginated with ``oldest``/``latest``/``inclusive``. Where the fake is stricter than Slack, it says
so: a ``thread_ts`` that names no message in the channel is refused (``thread_not_found``), and
``conversations.open`` supports one user only. It is more lenient in one place: Slack's reference
says bot tokens may lack permission for ``conversations.replies`` in channels; here a bot in the
channel may read its threads. Scopes are not modelled (``fail(..., error="missing_scope")`` plays one).

Split as the emulator is, state apart from wire: :mod:`bot.standins.slack.state` (the workspace
model, :class:`~bot.standins.slack.state.SlackState`), :mod:`bot.standins.slack.wire` (:class:`FakeSlack`,
the HTTP server speaking the Web API over that state), :mod:`bot.standins.slack.people`
(:class:`Workspace` and the payload builders) and :mod:`bot.standins.slack.socketmode`. Everything the
handlers touch is guarded by one lock; every recorded request notifies a condition that
:meth:`FakeSlack.wait_for` waits on.
"""

from __future__ import annotations

from bot.standins.slack.people import (
    Workspace,
    block_actions_payload,
    command_body,
    file_input_value,
    interaction_body,
    plain_text_value,
    signature_headers,
    view_submission_payload,
)
from bot.standins.slack.state import (
    Call,
    Download,
    Hold,
    MAX_ACTIONS_ELEMENTS,
    MAX_BLOCKS_TOTAL_TEXT,
    MAX_BUTTON_TEXT,
    MAX_BUTTON_VALUE,
    MAX_CONTEXT_ELEMENTS,
    MAX_FIELD_TEXT,
    MAX_HEADER_TEXT,
    MAX_ID_LENGTH,
    MAX_MARKDOWN_BLOCK_TEXT,
    MAX_MESSAGE_BLOCKS,
    MAX_MESSAGE_TEXT,
    MAX_PRIVATE_METADATA,
    MAX_SECTION_FIELDS,
    MAX_SECTION_TEXT,
    MAX_VIEW_BLOCKS,
    RESPONSE_URL_USES,
    ResponseUrlPost,
    SlackState,
    TRIGGER_TTL,
    Upload,
)
from bot.standins.slack.wire import (
    FakeSlack,
    LOGIN_PAGE,
    NOT_FOUND_PAGE,
    SERVER_ERROR_PAGE,
)

__all__ = [
    "Call",
    "Download",
    "FakeSlack",
    "Hold",
    "ResponseUrlPost",
    "Upload",
    "Workspace",
    "block_actions_payload",
    "command_body",
    "file_input_value",
    "interaction_body",
    "plain_text_value",
    "signature_headers",
    "view_submission_payload",
]
