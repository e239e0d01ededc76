"""Text from a person, a file or the platform, shown in Slack, stays text.

Wherever a name, a rejected line, a reason, a file name or a command's words are shown (thread
replies, the request's message, ephemeral answers, DMs, the form), they pass through
``blocks.escape``: they cannot close the code span they are shown in, make a link, mention a person
or a channel, format themselves, break a line, or make a block longer than Slack allows.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.domain import RejectedLine
from bot.slack import blocks

# What an attacker types: markup, links, mentions, and the characters that make them.
FRAGMENTS = [
    "`", "``", "```", "*", "_", "~", ">", "<", "&", "&lt;", "<!channel>", "<!here>", "<!everyone>", "@here",
    "@channel", "@everyone", "<@U012ABCDEF>", "<#C0123456|general>", "#general", "https://evil.example/reset",
    "http://", "www.evil.example", "evil.example", "mailto:a@b.example", "a@b.example", "<https://x.example|click>",
    "\n", "\r\n", "\u2028", "\u202e", "\u200b", "\t", "\x00", "\x1b[31m", ":", "/", ".", " ", "x", "名",
]
hostile_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=40).map("".join),
)

MENTION = re.compile(r"@(here|channel|everyone)|<[@#!]", re.I)
# What Slack's linker picks up in plain text: a scheme, www., an address, a dotted host name.
LINKABLE = re.compile(r"://|[^\W_]\.[^\W\d_]")


def plain_text_is_inert(shown: str) -> None:
    assert not set(shown) & set("<>`*~\n\r\u2028\u2029")
    assert not MENTION.search(shown)
    assert not LINKABLE.search(shown)
    for match in re.finditer("_", shown):  # an underscore only between letters or digits: no italics
        before, after = shown[match.start() - 1 : match.start()], shown[match.end() : match.end() + 1]
        assert re.fullmatch(r"[^\W_]", before) and re.fullmatch(r"[^\W_]", after), shown


@settings(max_examples=500, deadline=None)
@given(hostile_text, st.integers(min_value=4, max_value=400))
def test_plain_text_from_anyone_cannot_link_mention_format_or_overflow(text, limit):
    shown = blocks.escape(text, limit=limit)
    assert len(shown) <= limit
    plain_text_is_inert(shown)
    assert "&" not in shown.replace("&amp;", "").replace("&lt;", "").replace("&gt;", "")


@settings(max_examples=500, deadline=None)
@given(hostile_text, st.integers(min_value=4, max_value=400))
def test_a_value_in_a_code_span_cannot_close_it_or_overflow(text, limit):
    shown = blocks.escape(text, code=True, limit=limit)
    assert len(shown) <= limit
    assert shown[0] == shown[-1] == "`" and shown.count("`") == 2
    assert not set(shown) & set("<>\n\r\u2028\u2029\u202e\u200b\x00")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(hostile_text, hostile_text), min_size=1, max_size=30))
def test_a_thread_of_rejected_lines_keeps_every_value_in_its_code_span(rejected):
    text, content = blocks.rejected_lines_reply([RejectedLine(n, v, r) for n, (v, r) in enumerate(rejected, 2)], len(rejected))
    listing = content[1]["text"]["text"]
    assert all(len(block["text"]["text"]) <= 3000 for block in content)
    for bullet in listing.split("\n"):
        if bullet.startswith("… and"):
            continue
        # "• line N: `value`: reason": two backticks, and what is outside them is inert.
        assert bullet.count("`") == 2, bullet
        head, _, rest = bullet.partition("`")
        _, _, reason = rest.partition("`")
        plain_text_is_inert(head + reason)


def test_the_reported_url_stays_inside_the_code_span():
    value = "x` https://evil.example/reset-password `y"
    _, content = blocks.rejected_lines_reply([RejectedLine(2, value, "a space and '`' are not allowed")], 1)
    bullet = content[1]["text"]["text"]
    assert bullet == (
        "• line 2: `x\u02cb https://evil.example/reset-password \u02cby`: "
        "a space and '\u02cb' are not allowed"
    )


def test_ordinary_names_and_reasons_are_shown_as_they_are():
    assert blocks.escape("sensor_hz-01@a.b:c", code=True) == "`sensor_hz-01@a.b:c`"
    assert blocks.escape("too long: 37 characters, at most 32") == "too long: 37 characters, at most 32"
    assert blocks.escape("list.csv is 12.5 MB") == "list\u2024csv is 12.5 MB"
    assert blocks.escape("ライン_1 & <b>") == "ライン_1 &amp; &lt;b&gt;"


def test_a_long_value_is_cut_to_its_room_without_splitting_an_entity():
    shown = blocks.escape("&" * 500, code=True, limit=100)
    assert len(shown) <= 100 and shown.endswith("…`")
    assert shown[1:-2] == "&amp;" * ((100 - 3) // 5)


def test_only_a_slack_user_id_becomes_a_mention():
    assert blocks.user("U012ABCDEF") == "<@U012ABCDEF>"
    assert blocks.user("cli:root") == "cli:root"
    assert blocks.user("U1> <!channel") == "U1&gt; &lt;!channel"
