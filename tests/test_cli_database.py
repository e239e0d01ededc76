"""The CLI on a PostgreSQL URL: an unreachable server is one line, and the password shows nowhere."""

from click.testing import CliRunner

from bot.cli import cli
from bot.standins.postgres import free_port


def test_a_command_on_an_unreachable_database_says_so_in_one_line_without_the_password(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    result = CliRunner().invoke(cli, ["requests"], env={"IOTREG_DB": f"postgresql://iotreg:hunter2-pw@127.0.0.1:{port}/iotreg"})
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: cannot connect to the PostgreSQL database")
    assert f"127.0.0.1:{port}/iotreg" in result.output and "hunter2-pw" not in result.output


def test_help_never_shows_the_database_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"IOTREG_DB": "postgresql://iotreg:hunter2-pw@db.internal/iotreg", "DATABASE_URL": "postgres://x:hunter2-pw@h/d"}
    for args in (["--help"], ["db", "--help"], ["db", "copy", "--help"], ["serve", "--help"], ["requests", "--help"]):
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code == 0 and "hunter2-pw" not in result.output


def test_a_request_not_found_names_the_database_without_its_password(tmp_path, monkeypatch, postgres_url):
    monkeypatch.chdir(tmp_path)
    url = postgres_url.replace("iotreg@", "iotreg:hunter2-pw@")  # the test server trusts; the password goes unused
    result = CliRunner().invoke(cli, ["status", "4242"], env={"IOTREG_DB": url})
    assert result.exit_code == 1 and "no request or ApplyId 4242 in postgresql://iotreg:***@" in result.output
    assert "hunter2-pw" not in result.output
