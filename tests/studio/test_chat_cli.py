"""`python -m studio.chat`: the terminal chat, driven through its stdin like a user at the prompt."""

from __future__ import annotations

import subprocess
import sys


def test_terminal_chat_streams_replies_and_handles_commands(demo_model_path, tmp_path):
    script = "Hello there\n/system You are terse.\nAnd again\n/reset\n/exit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "studio.chat", str(demo_model_path), "--max-new-tokens", "8", "--seed", "1",
         "--cache-max-entry-count", "0.05"],
        input=script, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "session_len" in out  # the banner
    assert out.count("tokens,") == 2 and "tok/s" in out  # two replies, each with its token count and speed
    assert "system prompt set" in out and "new conversation" in out


def test_terminal_chat_bad_model_path_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "studio.chat", str(tmp_path / "missing")],
                          input="", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
