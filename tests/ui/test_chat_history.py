"""The conversation tree (ui/chat_history.py): branches from edits, reply versions, delete, search, export/import."""

from __future__ import annotations

import base64
import io
import json

import pytest

from ui import chat_history as ch


def texts(conv):
    return [(n["role"], n["content"]) for n in ch.path(conv)]


def test_edit_creates_a_branch_and_switching_back_restores_it():
    conv = ch.new_conversation("m", "be brief")
    first = ch.append(conv, "user", "Hi there")
    ch.append(conv, "assistant", "Hello")
    ch.append(conv, "user", "Tell a joke")
    ch.append(conv, "assistant", "No.")
    edited = ch.edit_branch(conv, first, "Hi again")
    assert texts(conv) == [("user", "Hi again")]  # the rest belongs to the old branch
    ch.append(conv, "assistant", "Hey")
    assert ch.siblings(conv, edited) == (2, 2)
    back = ch.switch(conv, edited, -1)
    assert back == first and ch.siblings(conv, first) == (1, 2)
    assert texts(conv) == [("user", "Hi there"), ("assistant", "Hello"), ("user", "Tell a joke"), ("assistant", "No.")]
    assert conv["title"] == "Hi there"


def test_regenerated_replies_are_versions():
    conv = ch.new_conversation()
    ch.append(conv, "user", "q")
    a1 = ch.append(conv, "assistant", "one")
    parent = ch.drop_trailing_assistant(conv)
    a2 = ch.add_child(conv, parent, "assistant", "two")
    a3 = ch.add_child(conv, parent, "assistant", "three")
    assert ch.siblings(conv, a3) == (3, 3) and texts(conv)[-1] == ("assistant", "three")
    assert ch.switch(conv, a3, -1) == a2 and ch.switch(conv, a2, -1) == a1
    assert ch.switch(conv, a1, -1) == a1  # no wrap past the first
    assert texts(conv)[-1] == ("assistant", "one")


def test_delete_takes_the_message_and_what_followed_and_keeps_siblings():
    conv = ch.new_conversation()
    ch.append(conv, "user", "q")
    a1 = ch.append(conv, "assistant", "one")
    a2 = ch.add_child(conv, ch.drop_trailing_assistant(conv), "assistant", "two")
    ch.append(conv, "user", "more")
    ch.delete(conv, a2)
    assert texts(conv) == [("user", "q"), ("assistant", "one")]
    assert a1 in conv["nodes"] and a2 not in conv["nodes"] and len(conv["nodes"]) == 3  # root, q, one


def test_store_search_and_order():
    store = ch.empty_store()
    a, b = ch.new_conversation(), ch.new_conversation()
    ch.append(a, "user", "about cats")
    ch.append(b, "user", "about dogs")
    ch.append(b, "assistant", "Dogs bark")
    store = ch.save(ch.save(store, a), b)
    assert [i for _, i in ch.search(store)] == [b["id"], a["id"]]
    assert ch.search(store, "BARK") == [("about dogs", b["id"])]
    store = ch.remove(store, b["id"])
    assert ch.search(store, "dogs") == [] and len(store["chats"]) == 1


def _png_url(size=(8, 8)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_export_then_import_gives_the_same_conversation():
    conv = ch.new_conversation("demo-model", "You are terse.", {"temperature": 0.3, "stop": ["###"]})
    ch.append(conv, "user", "What is $x^2$?", [_png_url()])
    ch.append(conv, "assistant", "```python\nprint(1)\n```")
    exported = ch.export_json(conv)
    back = ch.import_json(exported)
    assert ch.to_openai(back) == ch.to_openai(conv)
    assert back["model"] == "demo-model" and back["settings"] == conv["settings"] and back["system"] == "You are terse."
    assert json.loads(exported)["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    md = ch.export_markdown(conv)
    assert "**User**" in md and "```python" in md and "You are terse." in md


def test_import_refuses_what_is_not_a_conversation():
    with pytest.raises(ValueError, match="not JSON"):
        ch.import_json("{nope")
    with pytest.raises(ValueError, match="messages"):
        ch.import_json('{"foo": 1}')
    with pytest.raises(ValueError, match="role"):
        ch.import_json('[{"role": "robot", "content": "x"}]')


def test_images_past_the_budget_become_thumbnails():
    big = _png_url((600, 600))
    assert ch.image_to_keep(big, 0) == big
    thumb = ch.image_to_keep(big, ch.IMAGE_BUDGET_BYTES)
    assert thumb.startswith("data:image/jpeg;base64,")
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(thumb.split(",", 1)[1])))
    assert max(image.size) == ch.THUMBNAIL_PX
