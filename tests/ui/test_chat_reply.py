"""The chat's settings and reply helpers (ui/chat_reply.py, ui/chat_tab.py's display), without a browser."""

from __future__ import annotations

import pytest

from engine.errors import BadInputError
from ui import chat_history as ch
from ui.chat_reply import PARAM_NAMES, gen_config, settings_dict, stop_strings
from ui.chat_tab import meta_text, settings_values, to_display


def test_stop_sequences_field():
    assert stop_strings("###\n\nUser:\n  \\n\\n  ") == ["###", "User:", "  \n\n  "]
    assert stop_strings("") == [] and stop_strings(None) == [] and stop_strings(["a", ""]) == ["a"]


def test_gen_config_takes_every_setting_and_checks_them():
    cfg = gen_config(64, 0.0, 0.9, 40, 1.1, 7, 0.05, 0.5, -0.5, "END")
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.top_k, cfg.seed) == (64, False, 40, 7)
    assert (cfg.min_p, cfg.presence_penalty, cfg.frequency_penalty, cfg.stop_words) == (0.05, 0.5, -0.5, ["END"])
    assert gen_config(8, 1.0, 1.0, 0, 1.0, -1).seed is None and gen_config(8, 1.0, 1.0, 0, 1.0, -1).do_sample
    with pytest.raises(BadInputError, match="min_p"):
        gen_config(8, 1.0, 1.0, 0, 1.0, -1, min_p=2.0)


def test_settings_round_trip_through_a_saved_chat():
    params = (64, 0.3, 0.9, 40, 1.0, 5, 0.0, 0.0, 0.0, "a\\nb\nEND")
    saved = settings_dict(params)
    assert list(saved) == list(PARAM_NAMES)
    defaults = (256, 0.7, 0.9, 40, 1.0, -1, 0.0, 0.0, 0.0, "")
    assert settings_values(saved, defaults) == list(params)
    assert settings_values({"temperature": 0.1}, defaults)[1] == 0.1  # a missing setting keeps its default
    assert settings_values({"stop": ["x\ny"]}, defaults)[-1] == "x\\ny"  # an imported list, one per line


def test_display_shows_versions_and_tokens_and_hides_a_reply_not_started():
    conv = ch.new_conversation()
    ch.append(conv, "user", "Hi")
    ch.append(conv, "assistant", "one", stats={"generated": 3, "tps": 12.5, "finish": "length"})
    parent = ch.drop_trailing_assistant(conv)
    ch.add_child(conv, parent, "assistant", "")  # a regenerated reply that has not started
    shown = to_display(conv)
    assert [m["role"] for m in shown] == ["user"]
    conv["nodes"][ch.last_id(conv)]["content"] = "two"
    shown = to_display(conv)
    assert shown[-1]["content"].startswith("two") and "version 2/2" in shown[-1]["content"]
    first = ch.switch(conv, ch.last_id(conv), -1)
    assert meta_text(conv, conv["nodes"][first]) == "version 1/2 · 3 tokens · 12.5 tok/s · max new tokens reached"
