"""Tokenizer, chat templates and incremental detokenization.

The folder's own chat template is used when it has one; folders without one get a built-in template for
their family (InternLM2's <|im_start|> turns, Llama-2's [INST] turns). Detokenization is incremental and
never emits a broken UTF-8 sequence: text is released only once it no longer ends in a partial character.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import TokenizerLoadError  # noqa: F401 - re-exported
from engine.models.spec import ModelSpec

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERNLM2_TEMPLATE = "{{ bos_token }}" + CHATML_TEMPLATE
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# LLaVA-1.5's conversation (conv_vicuna_v1), for original-layout folders that ship no chat template; `<image>`
# markers sit in the user's text where the images go
LLAVA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set sys = 'A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human\\'s questions.' %}{% endif %}"
    "{{ bos_token + sys }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ ('USER: ' if not loop.first and loop.previtem['role'] == 'assistant' else ' USER: ') + m['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def load_tokenizer(path: Path, spec: ModelSpec | None = None, trust_remote_code: bool = False):
    """The folder's tokenizer (the engine's and the quantizer's one loader); TokenizerLoadError says what is missing
    or what to pass (--trust-remote-code for custom-code tokenizers such as InternLM2's)."""
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import; only loading needs it

    has_fast = (path / "tokenizer.json").is_file()
    if not has_fast and not any(path.glob("tokenizer*")) and not any(path.glob("*.model")):
        raise TokenizerLoadError(
            f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json)"
        )
    tok_cfg_path = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    custom = "AutoTokenizer" in (tok_cfg.get("auto_map") or {})
    if custom and not has_fast and not trust_remote_code:
        raise TokenizerLoadError(
            f"{path}: the tokenizer is custom code shipped in the folder ({tok_cfg['auto_map']['AutoTokenizer']}) "
            "and there is no tokenizer.json. Pass --trust-remote-code (EngineConfig(trust_remote_code=True)) to run "
            "it, as for InternLM2 checkpoints."
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise TokenizerLoadError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from e
    return tok


def chat_template_for(tokenizer, spec: ModelSpec, path: Path | None = None) -> str:
    if getattr(spec.vision, "chat_template", None):  # a conversation template the model's own code applies (InternVL)
        return spec.vision.chat_template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    processor_template = path / "chat_template.json" if path is not None else None
    if processor_template is not None and processor_template.is_file():  # llava-hf: the processor's template
        try:
            template = json.loads(processor_template.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            template = None
        if isinstance(template, str) and template:
            return template
    if spec.family == "llava":
        return LLAVA_TEMPLATE
    if spec.family == "internlm2" or "<|im_start|>" in tokenizer.get_vocab():
        return INTERNLM2_TEMPLATE if spec.family == "internlm2" else CHATML_TEMPLATE
    return LLAMA2_TEMPLATE


def stop_token_ids_for(tokenizer, spec: ModelSpec) -> frozenset[int]:
    """Ids that end a reply: the config's eos id(s), the tokenizer's eos, and end-of-turn tokens in the vocab."""
    ids = set(spec.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(ids)


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas.

    Fast tokenizers use the `tokenizers` library's DecodeStream (Rust; it holds back partial UTF-8 sequences
    itself). Others decode a sliding window: the text is released once it no longer ends in a partial
    character. Either way a few prompt tokens are kept as left context, so tokenizers that drop a leading
    space when a token starts the text (sentencepiece) decode the first reply token as they would mid-text.
    """

    CONTEXT_TOKENS = 4

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-self.CONTEXT_TOKENS :])
        self.text = ""  # the reply's text so far
        self._stream = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
                self._backend = backend
            except (ImportError, TypeError):  # tokenizers too old for a prefilled DecodeStream
                self._stream = None
        self.ids = context
        self.generated: list[int] = []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly complete text (possibly empty while a character is unfinished)."""
        self.generated.extend(token_ids)
        if self._stream is not None:
            delta = ""
            for t in token_ids:
                try:
                    chunk = self._stream.step(self._backend, t)
                except Exception:  # noqa: BLE001 - an id outside the vocabulary decodes to nothing
                    chunk = None
                if chunk:
                    delta += chunk
            self.text += delta
            return delta
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a reply: release text still held back for an unfinished character (as U+FFFD)."""
        full = self._decode(self.generated)
        if len(full) > len(self.text) and full.startswith(self.text):
            delta = full[len(self.text) :]
            self.text = full
            return delta
        return ""
