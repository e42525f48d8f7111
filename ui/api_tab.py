"""API tab: the OpenAI-compatible endpoint this same process serves at /v1 (one engine for the UI and the API),
with copy-paste curl and openai-client examples for the loaded model, and below them a snippet for every route in
curl, Python and JavaScript (ui/api_snippets.py). The base URL is taken from the browser's own request, so through
an SSH port-forward it reads http://localhost:PORT/v1."""

from __future__ import annotations

import html

import gradio as gr

from ui.api_snippets import snippets
from ui.state import StudioState


def base_url(request: gr.Request | None, state: StudioState) -> str:
    host, scheme = None, "http"
    if request is not None:
        host = request.headers.get("x-forwarded-host") or request.headers.get("host")
        scheme = request.headers.get("x-forwarded-proto") or "http"
    host = host or f"127.0.0.1:{state.settings.server_port}"
    root = state.settings.root_path.rstrip("/")
    return f"{scheme}://{host}{root}/v1"


def model_name(state: StudioState) -> str:
    if state.settings.served_model_name:
        return state.settings.served_model_name
    loaded = state.manager.current
    return loaded.name if loaded else "MODEL"


def examples(state: StudioState, url: str) -> tuple[str, str, str, str]:
    """(info html, the chat route's curl, its Python, the models route's curl): the quick start above the
    per-route snippets, from the same generator (ui/api_snippets.py)."""
    name = model_name(state)
    routes = {r.path: r for r in snippets(url, name, state.settings.api_keys_required)}
    chat, models_route = routes["/v1/chat/completions"], routes["/v1/models"]
    curl, python, models = chat.curl, chat.python, models_route.curl
    loaded = state.manager.current
    model_note = (f"Serving <code>{html.escape(name)}</code>." if loaded
                  else "No model is loaded: requests get an error until one is loaded in the Model tab.")
    auth = ("Requests need <code>Authorization: Bearer KEY</code> with one of the keys passed to "
            "<code>--api-keys</code>; the examples read it from <code>$STUDIO_API_KEY</code>."
            if state.settings.api_keys_required else
            "No API key is required (start with <code>--api-keys KEY</code> to require one); "
            "the openai client still wants a value: any string works.")
    info = (
        f'<div class="studio-card" id="api-info"><table class="studio-table">'
        f"<tr><th>Base URL</th><td><code id=\"api-base-url\">{html.escape(url)}</code></td></tr>"
        f"<tr><th>Model</th><td>{model_note}</td></tr>"
        f"<tr><th>Auth</th><td>{auth}</td></tr>"
        "<tr><th>Endpoints</th><td><code>/v1/models</code>, <code>/v1/models/{model}</code>, "
        "<code>/v1/chat/completions</code>, <code>/v1/completions</code> (SSE streaming), <code>/health</code>, "
        "<code>/metrics</code>: examples for each below</td></tr>"
        "</table><p class=\"studio-muted\">The API and this UI share one engine: their requests are batched "
        "together, and a model loaded here is the one the API serves.</p></div>"
    )
    return info, curl, python, models


def build_api_tab(state: StudioState):
    info = gr.HTML(elem_id="api-info-box")
    with gr.Row(equal_height=False):
        with gr.Column():
            curl = gr.Code(language="shell", label="curl: streaming chat completion", interactive=False)
            models = gr.Code(language="shell", label="curl: list models", interactive=False)
        with gr.Column():
            python = gr.Code(language="python", label="Python: openai client", interactive=False)
    gr.Markdown("#### Every route: curl, Python, JavaScript")
    route_codes = []
    for i, route in enumerate(snippets("http://HOST/v1", "MODEL", False)):
        with gr.Accordion(f"{route.method} {route.path.replace('MODEL', '{model}')} · {route.title}", open=i == 0,
                          elem_id=f"api-route-{i}"):
            with gr.Row(equal_height=False):
                route_codes += [gr.Code(language="shell", label="curl", interactive=False),
                                gr.Code(language="python", label="Python", interactive=False),
                                gr.Code(language="javascript", label="JavaScript (fetch)", interactive=False)]

    def refresh(request: gr.Request):
        url = base_url(request, state)
        codes = [code for r in snippets(url, model_name(state), state.settings.api_keys_required)
                 for code in (r.curl, r.python, r.javascript)]
        return (*examples(state, url), *codes)

    return refresh, [info, curl, python, models, *route_codes]
