"""Saved conversations as plain JSON-able dicts (no Gradio here): a message tree with branches and reply versions,
search, titles, and export to Markdown / OpenAI-messages JSON and import back.

A conversation keeps every message it ever had in `nodes` (id -> node). A node's `children` are the messages that
followed it; siblings are alternatives: edited user messages (branches) or regenerated replies (versions), and the
parent's `active` index says which one the chat shows. The chat on screen is the path from the root that always
takes the active child, so switching a version or a branch is one index change, and nothing is ever lost.

The whole store lives in the user's browser (gr.BrowserState, localStorage); images go in as data URLs while they fit
IMAGE_BUDGET_BYTES per conversation, as small thumbnails beyond it."""

from __future__ import annotations

import base64
import copy
import io
import json
import time
import uuid

ROOT = "root"
IMAGE_BUDGET_BYTES = 2 * 1024 * 1024  # full images kept per conversation (localStorage holds ~5 MB per site)
THUMBNAIL_PX = 160
TITLE_CHARS = 48
SETTING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "seed", "stop")


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def empty_store() -> dict:
    """What the browser holds: every saved chat by id, the newest first in `order`, and per-model presets."""
    return {"chats": {}, "order": [], "presets": {}}


def new_conversation(model: str = "", system: str = "", settings: dict | None = None, title: str = "") -> dict:
    now = time.time()
    return {"id": new_id(), "title": title, "created": now, "updated": now, "model": model, "system": system,
            "settings": dict(settings or {}),
            "nodes": {ROOT: {"id": ROOT, "role": "root", "content": "", "parent": None, "children": [], "active": 0}}}


def _node(role: str, content: str, parent: str, images=None, stats=None) -> dict:
    return {"id": new_id(), "role": role, "content": content, "images": list(images or []), "parent": parent,
            "children": [], "active": 0, "stats": stats}


def path(conv: dict) -> list[dict]:
    """The messages on screen: from the root, always the active child."""
    nodes, out = conv["nodes"], []
    node = nodes[ROOT]
    while node["children"]:
        node = nodes[node["children"][min(node["active"], len(node["children"]) - 1)]]
        out.append(node)
    return out


def path_to(conv: dict, node_id: str) -> list[dict]:
    """The messages from the first one down to `node_id` (whatever branch it is on)."""
    nodes, out = conv["nodes"], []
    while node_id != ROOT:
        out.append(nodes[node_id])
        node_id = nodes[node_id]["parent"]
    return out[::-1]


def last_id(conv: dict) -> str:
    shown = path(conv)
    return shown[-1]["id"] if shown else ROOT


def add_child(conv: dict, parent: str, role: str, content: str, images=None, stats=None) -> str:
    """A new message under `parent`, made the active one (a new branch or version when parent had children)."""
    node = _node(role, content, parent, images, stats)
    conv["nodes"][node["id"]] = node
    siblings = conv["nodes"][parent]["children"]
    siblings.append(node["id"])
    conv["nodes"][parent]["active"] = len(siblings) - 1
    touch(conv)
    if not conv.get("title") and role == "user" and content.strip():
        conv["title"] = title_from(content)
    return node["id"]


def append(conv: dict, role: str, content: str, images=None, stats=None) -> str:
    """A message at the end of the chat on screen."""
    return add_child(conv, last_id(conv), role, content, images, stats)


def edit_branch(conv: dict, node_id: str, content: str) -> str:
    """An edited user message: a sibling of the old one (its images kept), which stays reachable as a branch."""
    old = conv["nodes"][node_id]
    return add_child(conv, old["parent"], old["role"], content, old.get("images"))


def edit_in_place(conv: dict, node_id: str, content: str) -> None:
    """Rewrite a message where it is (an assistant reply steered by hand); what follows it stays."""
    conv["nodes"][node_id]["content"] = content
    touch(conv)


def delete(conv: dict, node_id: str) -> None:
    """Take a message out with the replies under it; its siblings (other branches / versions) stay."""
    nodes = conv["nodes"]
    if node_id == ROOT or node_id not in nodes:
        return
    parent = nodes[nodes[node_id]["parent"]]
    index = parent["children"].index(node_id)
    parent["children"].pop(index)
    parent["active"] = max(0, min(parent["active"] if parent["active"] < index else parent["active"] - 1,
                                  len(parent["children"]) - 1))
    stack = [node_id]
    while stack:
        gone = nodes.pop(stack.pop())
        stack.extend(gone["children"])
    touch(conv)


def siblings(conv: dict, node_id: str) -> tuple[int, int]:
    """(1-based position, count) of a message among its alternatives: 2/3 = the second of three versions."""
    parent = conv["nodes"][conv["nodes"][node_id]["parent"]]
    return parent["children"].index(node_id) + 1, len(parent["children"])


def switch(conv: dict, node_id: str, step: int) -> str:
    """Show the previous (-1) or next (+1) alternative of a message; returns the id now shown in its place."""
    parent = conv["nodes"][conv["nodes"][node_id]["parent"]]
    index = parent["children"].index(node_id)
    parent["active"] = max(0, min(index + step, len(parent["children"]) - 1))
    return parent["children"][parent["active"]]


def drop_trailing_assistant(conv: dict) -> str:
    """The id a regenerated reply goes under: the last user message on screen (its reply becomes a version)."""
    shown = path(conv)
    while shown and shown[-1]["role"] == "assistant":
        shown.pop()
    return shown[-1]["id"] if shown else ROOT


def touch(conv: dict) -> None:
    conv["updated"] = time.time()


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


# ---- the store ---------------------------------------------------------------------------------------

def save(store: dict, conv: dict) -> dict:
    """The store with `conv` in it, moved to the top of the list (a copy: Gradio sees a new value)."""
    store = copy.deepcopy(store or empty_store())
    store.setdefault("presets", {})
    store["chats"][conv["id"]] = copy.deepcopy(conv)
    store["order"] = [conv["id"]] + [i for i in store["order"] if i != conv["id"]]
    return store


def remove(store: dict, conv_id: str) -> dict:
    store = copy.deepcopy(store or empty_store())
    store["chats"].pop(conv_id, None)
    store["order"] = [i for i in store["order"] if i != conv_id]
    return store


def search(store: dict, query: str = "") -> list[tuple[str, str]]:
    """(title, id) of the saved chats whose title or any message (every branch) holds `query`, newest first."""
    query = (query or "").strip().lower()
    out = []
    for conv_id in (store or empty_store())["order"]:
        conv = store["chats"].get(conv_id)
        if conv is None:
            continue
        texts = [conv.get("title", "")] + [n["content"] for n in conv["nodes"].values()]
        if not query or any(query in t.lower() for t in texts):
            out.append((conv.get("title") or "New chat", conv_id))
    return out


# ---- images ------------------------------------------------------------------------------------------

def data_url_bytes(url: str) -> int:
    return len(url) * 3 // 4


def image_to_keep(url: str, used_bytes: int, budget: int = IMAGE_BUDGET_BYTES) -> str:
    """A data URL as the conversation keeps it: whole while the chat's images fit the budget, else a thumbnail."""
    if used_bytes + data_url_bytes(url) <= budget:
        return url
    from PIL import Image

    raw = base64.b64decode(url.split(",", 1)[1])
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_bytes(conv: dict) -> int:
    return sum(data_url_bytes(u) for n in conv["nodes"].values() for u in n.get("images") or [])


# ---- export / import ---------------------------------------------------------------------------------

def to_openai(conv: dict) -> list[dict]:
    """The chat on screen as OpenAI messages: system first, images as image_url parts with data URLs."""
    messages = [{"role": "system", "content": conv["system"]}] if (conv.get("system") or "").strip() else []
    for node in path(conv):
        if node.get("images"):
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in node["images"]]
            messages.append({"role": node["role"], "content": parts + [{"type": "text", "text": node["content"]}]})
        else:
            messages.append({"role": node["role"], "content": node["content"]})
    return messages


def export_json(conv: dict) -> str:
    return json.dumps({"title": conv.get("title", ""), "model": conv.get("model", ""),
                       "settings": conv.get("settings", {}), "messages": to_openai(conv)}, indent=2,
                      ensure_ascii=False)


def export_markdown(conv: dict) -> str:
    lines = [f"# {conv.get('title') or 'Chat'}", ""]
    if conv.get("model"):
        lines += [f"Model: `{conv['model']}`", ""]
    if (conv.get("system") or "").strip():
        lines += ["**System**", "", conv["system"].strip(), ""]
    for node in path(conv):
        lines += [f"**{node['role'].capitalize()}**", ""]
        lines += [f"![image {i + 1}]({u})" for i, u in enumerate(node.get("images") or [])]
        lines += [node["content"], ""]
    return "\n".join(lines)


def import_json(text: str) -> dict:
    """A conversation from exported JSON: {"messages": [...]} (ours) or a bare OpenAI messages list. Raises
    ValueError with what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the file is not JSON ({e})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("the file holds no OpenAI messages list ({\"messages\": [{\"role\": ..., \"content\": ...}]})")
    meta = data if isinstance(data, dict) else {}
    conv = new_conversation(model=str(meta.get("model") or ""), settings=meta.get("settings") or {},
                            title=str(meta.get("title") or ""))
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i + 1}: role must be system, user or assistant, got {role!r}")
        text, images = content, []
        if isinstance(content, list):
            text = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            images = [p["image_url"]["url"] for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
        if not isinstance(text, str):
            raise ValueError(f"message {i + 1}: content must be text or a list of parts")
        if role == "system" and i == 0:
            conv["system"] = text
        else:
            append(conv, role, text, images)
    return conv
