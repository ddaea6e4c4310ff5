"""`grok serve`'s checks before anything loads: one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import subprocess

import pytest

from conftest import grok_command


def run_grok(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd, base = grok_command()
    return subprocess.run([*cmd, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, says", [
    (["--host", "0.0.0.0"], "--allow-unauthenticated"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"], "one host only"),
    (["--chat-template", "chatml"], "human-assistant"),
])
def test_refused_before_loading(args, says):
    r = run_grok("serve", "--model", "demo", "--port", "0", *args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]


def test_without_the_extra_says_what_to_install(monkeypatch, capsys):
    import grokcli.server
    from grokcli.cli import main

    monkeypatch.setattr(grokcli.server, "missing_packages", lambda: ["fastapi", "uvicorn"])
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "demo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'grokcli[serve]'" in err[0] and "fastapi" in err[0]
