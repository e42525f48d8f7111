"""The embedded demo model and the local tokenizer: built offline, deterministically, with random weights.

No model hub is needed: the app's fallback model (`python app.py --demo`, or with no MODEL when the default
SmolLM2 can be neither found nor converted: studio/default_model.py) and the tests' tiny checkpoints are made on
the spot:
- `build_tokenizer`: a byte-level BPE tokenizer trained on a small corpus kept in this file (English, some
  Chinese and emoji, so multi-byte UTF-8 is covered). Any UTF-8 text encodes and decodes losslessly. Special
  tokens follow Llama / InternLM2 numbering (`<unk>` 0, `<s>` 1, `</s>` 2) plus ChatML's `<|im_start|>` /
  `<|im_end|>`; the chat template is ChatML, as InternLM2 uses.
- `build_demo_model`: a tiny real-architecture `LlamaForCausalLM` saved as a Hugging Face folder (safetensors,
  config.json, generation_config.json, tokenizer), built once into a cache folder and reused.

Weights are random, so the demo model's replies are gibberish; it exists so that every path of the app (chat,
quantize, compare, API) runs end to end on any machine. Heavy imports (torch, transformers, tokenizers) happen
inside the functions, so importing this module for `DEMO_MODEL_NOTE` or `default_demo_model_dir` is cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine import envs
from engine.staging import marker_matches, staged_folder

DEMO_MODEL_NOTE = "demo model: a tiny Llama with random weights, built locally; its replies are gibberish"

# Bump when anything below changes what gets written: a folder built by an older recipe is rebuilt.
DEMO_MODEL_RECIPE_VERSION = 1
BUILD_MARKER = ".build-complete"  # written last; its presence means the folder is complete

TOKENIZER_VOCAB_SIZE = 1024  # specials + 256 byte symbols + BPE merges; small, so the embedding stays tiny
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")  # ids 0..4, in this order
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN = SPECIAL_TOKENS
MODEL_MAX_LENGTH = 2048

# Qwen2's pre-tokenizer split (also close to Llama-3's). Using it here means that transformers' Qwen2Tokenizer,
# which rebuilds the pre-tokenizer from its own code when config.json says qwen2, tokenizes like tokenizer.json.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, as InternLM2 (the seeds' model) writes it: bos first, then one <|im_start|>role\n...<|im_end|>\n per
# message (a system message is just the first turn), then the assistant's opening when add_generation_prompt.
# OpenAI-style content lists keep their text parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The tokenizer's training text. Varied on purpose: prose, dialogue, code, numbers, accents (2-byte UTF-8),
# Chinese (3-byte) and emoji (4-byte, with skin-tone modifiers and ZWJ sequences). Changing it changes the
# vocabulary, hence DEMO_MODEL_RECIPE_VERSION.
TRAINING_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time, in a small village by the sea, there lived an old fisherman and his curious granddaughter.
Every morning they walked down to the harbour, counted the boats, and talked about the weather.
"Will it rain today?" she asked. "Perhaps," he said, "but the wind is coming from the west, so it may clear up."
The model reads a prompt, predicts the next token, and repeats until it reaches the end of the sequence.
Large language models are trained on text from books, articles, websites, and conversations.
Quantization stores weights in fewer bits: four-bit integers with a scale and a zero point per group.
Activation-aware weight quantization protects the channels that matter most by scaling them before rounding.
The key-value cache grows with every generated token, so long conversations need a lot of memory.
Paged attention splits the cache into fixed-size blocks, like pages of virtual memory in an operating system.
Continuous batching lets new requests join the running batch as soon as others finish.
To bake bread, mix flour, water, salt and yeast; knead the dough for ten minutes, let it rise, then bake it.
A good cup of tea needs fresh water, a warm pot, and three to five minutes of patience.
The train to the mountains leaves at 7:45 from platform 3 and arrives shortly after noon.
She bought 12 apples, 6 oranges and 2 kilograms of potatoes for $18.50 at the market on Saturday.
In 1969, astronauts landed on the Moon; in 1990, the Hubble Space Telescope was launched into orbit.
Water boils at 100 degrees Celsius at sea level, and freezes at 0 degrees.
The capital of France is Paris. The capital of Japan is Tokyo. The capital of China is Beijing.
Please summarize the following paragraph in one sentence, and keep the important numbers.
Can you help me write an email to my colleague about the meeting next Tuesday afternoon?
Sure! Here is a short draft: "Hi Sam, could we move our meeting to 3 p.m.? Thanks, Alex."
What is the difference between a list and a tuple in Python? A list is mutable; a tuple is not.
Explain it like I'm five: the computer is a very fast calculator that follows instructions exactly.
I think, therefore I am. To be, or not to be, that is the question.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
User: Hello! Who are you?
Assistant: I'm a small demo assistant. I don't know much, but I'm happy to chat.
User: Tell me a story about a dragon who loved books.
Assistant: There once was a dragon named Ember who guarded a library instead of gold.
def greet(name: str) -> str:
    return f"Hello, {name}!"

for i in range(10):
    print(i * i, end=", ")

import torch
x = torch.randn(4, 8)  # [batch, hidden]
y = x @ x.T + 1e-6
if y.sum() > 0 and not done:
    total += 1
{"role": "user", "content": "What's the weather like?"}, [1, 2, 3], (a, b), <tag attr="value">text</tag>
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14159 2.71828 -7 +12 50% 1/2 #1 @home ~/path a_b a-b
Punctuation: ! ? . , ; : ' " ( ) [ ] { } < > / \\ | _ - + = * & ^ % $ # @ ~ `
Café, naïve, façade, jalapeño, Zürich, crème brûlée, déjà vu, résumé, São Paulo, Ærø, smørrebrød.
Größe, Straße, über, schön; ¿Dónde está la biblioteca? ¡Hola! Ça va très bien, merci.
你好，世界！今天天气很好，我们去公园散步吧。
我喜欢读书、写字和听音乐。这个模型很小，它的回答没有意义。
人工智能正在改变我们的生活和工作方式。量化可以减少显存占用，提高推理速度。
请用一句话总结这段文字。谢谢你的帮助！
中文、English 和数字 123 可以混在一起写。
北京是中国的首都，上海是一个大城市。春天来了，花开了。
こんにちは、世界。ありがとうございます。안녕하세요. Привет, мир! Γειά σου κόσμε. مرحبا بالعالم
Emoji: 🙂 😀 😂 🤔 👍 👍🏽 👋🏻 ❤️ 🎉 🚀 🌍 🔥 ✨ 🐍 🦀 🍕 ☕ 📚 💡 ✅ ❌ ⭐
Family: 👨‍👩‍👧‍👦, flags: 🇫🇷 🇨🇳 🇯🇵, hands: 🙏🏾 ✌️ 🤝, faces: 🥳 😴 🤖 👻
Great job! 🎉 See you tomorrow 👋 Good night 🌙 I love it ❤️ so much 😍
Thank you very much for your help today, I really appreciate it.
The meeting has been moved to Thursday at ten o'clock in the small conference room.
Remember to drink water, take short breaks, and stretch your arms and legs during the day.
Machine learning, deep learning, neural networks, transformers, attention, embeddings, tokens, layers.
The tokenizer splits text into pieces; each piece maps to an integer id in the vocabulary.
Byte-level encoding means that every possible string can be represented, even ones never seen in training.
"""


def _train_tokenizer():
    """The `tokenizers.Tokenizer`, trained on TRAINING_CORPUS. Deterministic: same corpus, same merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    # No normalizer: any byte sequence of valid UTF-8 must survive encode -> decode unchanged.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Like Llama / InternLM2: encode(..., add_special_tokens=True) prepends <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """Train the byte-level BPE tokenizer and, when `out_dir` is given, `save_pretrained` it there.

    Returns a transformers fast tokenizer (`PreTrainedTokenizerFast`, an alias of `TokenizersBackend` in
    transformers 5); `AutoTokenizer.from_pretrained(out_dir)` loads the same thing back.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=EOS_TOKEN,  # as InternLM2: pad with </s>
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # True would turn "a , b" into "a, b" on decode
        model_max_length=MODEL_MAX_LENGTH,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos / eos / pad / im_start / im_end ids of a tokenizer made by build_tokenizer."""
    return {
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "pad_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "im_start_token_id": tokenizer.convert_tokens_to_ids(IM_START_TOKEN),
        "im_end_token_id": tokenizer.convert_tokens_to_ids(IM_END_TOKEN),
    }


def init_random_weights_(model, seed: int, bias_std: float = 0.2) -> None:
    """Overwrite every parameter with seeded random values, in place, independent of the model's own init order.

    Scales keep activations near unit size (linear: std 1/sqrt(fan_in), embeddings: std 1), so logits are well
    spread and comparisons between implementations are meaningful; transformers' init (std 0.02, norms at 1,
    biases at 0) would leave near-uniform logits, and norm or bias mix-ups invisible. Norm weights are drawn in
    [0.5, 1.5) and biases with std `bias_std`, so loading the wrong one shows up in the logits.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):  # tied weights appear once
            if name.endswith(".bias"):
                values = torch.randn(param.shape, generator=generator) * bias_std
            elif "norm" in name:
                values = torch.rand(param.shape, generator=generator) + 0.5
            elif param.dim() == 2 and "embed" in name:
                values = torch.randn(param.shape, generator=generator)
            elif param.dim() == 2:
                values = torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5
            else:
                raise ValueError(f"no init rule for parameter {name} of shape {tuple(param.shape)}")
            param.copy_(values.to(param.dtype))


def save_causal_lm(model, tokenizer, out_dir: str | os.PathLike, max_shard_size: int | str | None = None) -> None:
    """save_pretrained the model (safetensors) with the tokenizer; eos in generation_config lists </s> and <|im_end|>.

    config.json keeps what transformers 5 writes (`dtype`, `rope_parameters`) and also gets `torch_dtype`, the key
    hub checkpoints made by transformers 4 carry, so either reader finds the dtype.
    """
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    ids = special_token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=[ids["eos_token_id"], ids["im_end_token_id"]],
        pad_token_id=ids["pad_token_id"],
    )
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out_dir), **kwargs)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = config.get("dtype") or "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def default_demo_model_dir() -> Path:
    """$STUDIO_CACHE_DIR/demo-model, else ~/.cache/quant-studio/demo-model."""
    return envs.studio_cache_dir().expanduser() / "demo-model"


def is_demo_model(folder: str | os.PathLike) -> bool:
    """True for a folder this module built (any recipe): its weights are random, so quality figures on it mean
    nothing."""
    return (Path(folder) / BUILD_MARKER).is_file()


def is_complete_build(folder: str | os.PathLike) -> bool:
    """True when `folder` holds a finished demo-model build of the current recipe."""
    return marker_matches(folder, BUILD_MARKER, "recipe_version", DEMO_MODEL_RECIPE_VERSION)


_DEMO_README = """\
# Demo model (random weights)

This folder was built locally by `studio/demo_model.py`, with no download. It is a tiny but real
`LlamaForCausalLM` checkpoint (hidden {hidden}, {layers} layers, {heads} attention heads, {kv_heads} KV heads,
intermediate {intermediate}, vocab {vocab}) whose weights are **random** (seed {seed}): its replies are gibberish.
It is there so that the app, the OpenAI-compatible API and the quantizer run end to end on any machine.

The tokenizer is a byte-level BPE trained on a few KB of text, with a ChatML chat template
(`<|im_start|>role\\n...<|im_end|>\\n`). Delete this folder to rebuild it; load a real model for real answers.
"""

DEMO_SHAPE = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 256}  # GQA: 2 q heads per kv
DEMO_SEED = 0


def _write_demo_model(out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=DEMO_SHAPE["hidden"],
        intermediate_size=DEMO_SHAPE["intermediate"],
        num_hidden_layers=DEMO_SHAPE["layers"],
        num_attention_heads=DEMO_SHAPE["heads"],
        num_key_value_heads=DEMO_SHAPE["kv_heads"],
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        dtype="float32",
    )
    torch.manual_seed(DEMO_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    init_random_weights_(model, seed=DEMO_SEED)
    save_causal_lm(model, tokenizer, out_dir)
    (out_dir / "README.md").write_text(_DEMO_README.format(**DEMO_SHAPE, vocab=len(tokenizer), seed=DEMO_SEED))
    marker = {"recipe_version": DEMO_MODEL_RECIPE_VERSION, "note": DEMO_MODEL_NOTE}
    (out_dir / BUILD_MARKER).write_text(json.dumps(marker) + "\n")  # last: the folder is complete from here on


def build_demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo model's folder, built on first use (well under 10 s on CPU) and reused afterwards.

    `cache_dir` is the model folder itself (default: `default_demo_model_dir()`). The build goes into a temporary
    sibling folder that is renamed into place once complete, so a crash or a concurrent build never leaves a
    half-written folder behind a complete-looking name. A folder from an older recipe is replaced; a non-empty
    folder that is not a demo-model build is left alone (FileExistsError).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_demo_model_dir()
    if is_complete_build(target):
        return target
    if target.exists() and any(target.iterdir()) and not (target / BUILD_MARKER).exists():
        raise FileExistsError(f"{target} exists and is not a demo-model build; pass another cache_dir or remove it")
    with staged_folder(target, keep_if=is_complete_build) as staging:
        _write_demo_model(staging)
    return target
