"""Copy-paste snippets for every route the server has (/v1/chat/completions, /v1/completions, /v1/models,
/v1/models/{id}, /health, /metrics) in three languages: curl, Python (the `openai` client; httpx for the two routes
outside the OpenAI API) and JavaScript (`fetch`), filled in with the base URL and the served model's id. With
--api-keys on, each guarded route sends the key: $STUDIO_API_KEY in the shell and in Python, a YOUR_API_KEY
placeholder in JavaScript. Plain strings, no Gradio: tests run them against the real server."""

from __future__ import annotations

from dataclasses import dataclass

JS_KEY_PLACEHOLDER = "YOUR_API_KEY"


@dataclass(frozen=True)
class Route:
    title: str
    method: str
    path: str  # under the server's root ("/v1/models", "/health")
    curl: str
    python: str
    javascript: str


def _curl_auth(keys: bool) -> str:
    return '  -H "Authorization: Bearer $STUDIO_API_KEY" \\\n' if keys else ""


def _py_client(url: str, keys: bool) -> str:
    key = 'os.environ["STUDIO_API_KEY"]' if keys else '"none"'
    return ("import os\n" if keys else "") + f'from openai import OpenAI\n\nclient = OpenAI(base_url="{url}", ' \
        f"api_key={key})\n"


def _js_headers(keys: bool, body: bool) -> str:
    parts = (['"Content-Type": "application/json"'] if body else []) + \
        (['"Authorization": `Bearer ${API_KEY}`'] if keys else [])
    return "{" + ", ".join(parts) + "}"


def _js_prelude(keys: bool) -> str:
    return f'const API_KEY = "{JS_KEY_PLACEHOLDER}";  // one of the keys given to --api-keys\n' if keys else ""


def snippets(url: str, model: str, keys: bool) -> list[Route]:
    """`url`: the API's base URL (…/v1); `model`: the id requests name; `keys`: whether --api-keys is on."""
    root = url[:-len("/v1")] if url.endswith("/v1") else url
    auth = _curl_auth(keys)
    chat = Route(
        "Chat (streaming)", "POST", "/v1/chat/completions",
        f"curl -N {url}/chat/completions \\\n  -H \"Content-Type: application/json\" \\\n{auth}"
        f"  -d '{{\"model\": \"{model}\", \"stream\": true, \"max_tokens\": 128,\n"
        '       "messages": [{"role": "user", "content": "Tell me a story"}]}\'',
        _py_client(url, keys)
        + "stream = client.chat.completions.create(\n"
        f'    model="{model}",\n'
        '    messages=[{"role": "user", "content": "Tell me a story"}],\n'
        "    max_tokens=128,\n"
        "    stream=True,\n"
        ")\n"
        "for chunk in stream:\n"
        '    print(chunk.choices[0].delta.content or "", end="", flush=True)\n'
        "print()\n",
        _js_prelude(keys)
        + f'const response = await fetch("{url}/chat/completions", {{\n'
        f'  method: "POST",\n  headers: {_js_headers(keys, True)},\n'
        f'  body: JSON.stringify({{model: "{model}", stream: true, max_tokens: 128,\n'
        '    messages: [{role: "user", content: "Tell me a story"}]}),\n});\n'
        "const reader = response.body.getReader();\nconst decoder = new TextDecoder();\nlet buffer = \"\";\n"
        "for (;;) {\n  const {done, value} = await reader.read();\n  if (done) break;\n"
        "  buffer += decoder.decode(value, {stream: true});\n  const lines = buffer.split(\"\\n\");\n"
        "  buffer = lines.pop();\n  for (const line of lines) {\n"
        "    if (!line.startsWith(\"data: \") || line === \"data: [DONE]\") continue;\n"
        "    const delta = JSON.parse(line.slice(6)).choices[0].delta.content;\n"
        "    if (delta) console.log(delta);\n  }\n}\n",
    )
    completion = Route(
        "Completion (plain text)", "POST", "/v1/completions",
        f"curl {url}/completions \\\n  -H \"Content-Type: application/json\" \\\n{auth}"
        f"  -d '{{\"model\": \"{model}\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}}'",
        _py_client(url, keys)
        + f'completion = client.completions.create(model="{model}", prompt="Once upon a time", max_tokens=32)\n'
        "print(completion.choices[0].text)\n",
        _js_prelude(keys)
        + f'const response = await fetch("{url}/completions", {{\n'
        f'  method: "POST",\n  headers: {_js_headers(keys, True)},\n'
        f'  body: JSON.stringify({{model: "{model}", prompt: "Once upon a time", max_tokens: 32}}),\n}});\n'
        "console.log((await response.json()).choices[0].text);\n",
    )
    models = Route(
        "List models", "GET", "/v1/models",
        f"curl {url}/models" + (' -H "Authorization: Bearer $STUDIO_API_KEY"' if keys else ""),
        _py_client(url, keys) + "for model in client.models.list():\n    print(model.id)\n",
        _js_prelude(keys)
        + f'const response = await fetch("{url}/models", {{headers: {_js_headers(keys, False)}}});\n'
        "console.log((await response.json()).data.map((m) => m.id));\n",
    )
    one_model = Route(
        "One model", "GET", f"/v1/models/{model}",
        f"curl {url}/models/{model}" + (' -H "Authorization: Bearer $STUDIO_API_KEY"' if keys else ""),
        _py_client(url, keys) + f'print(client.models.retrieve("{model}"))\n',
        _js_prelude(keys)
        + f'const response = await fetch("{url}/models/{model}", {{headers: {_js_headers(keys, False)}}});\n'
        "console.log(await response.json());\n",
    )
    health = Route(
        "Health (no key needed)", "GET", "/health",
        f"curl {root}/health",
        f'import httpx\n\nprint(httpx.get("{root}/health").json())\n',
        f'const response = await fetch("{root}/health");\nconsole.log(await response.json());\n',
    )
    py_metrics_headers = ', headers={"Authorization": f"Bearer {os.environ[\'STUDIO_API_KEY\']}"}' if keys else ""
    metrics = Route(
        "Metrics (Prometheus)", "GET", "/metrics",
        f"curl {root}/metrics" + (' -H "Authorization: Bearer $STUDIO_API_KEY"' if keys else ""),
        ("import os\n" if keys else "")
        + f'import httpx\n\nprint(httpx.get("{root}/metrics"{py_metrics_headers}).text)\n',
        _js_prelude(keys)
        + f'const response = await fetch("{root}/metrics", {{headers: {_js_headers(keys, False)}}});\n'
        "console.log(await response.text());\n",
    )
    return [chat, completion, models, one_model, health, metrics]
