"""Tests of the offline checkpoint builders: the local tokenizer, the demo model and tests/model_factory.py.

Everything the engine tests stand on: checkpoints load in transformers, builds are byte-for-byte reproducible,
and the InternLM2 layout holds exactly the Llama reference's weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from studio import demo_model
from studio.demo_model import BUILD_MARKER, DEMO_MODEL_NOTE, build_demo_model, build_tokenizer
from tests.model_factory import make_internlm2, make_llama, make_qwen2

ROUND_TRIP_TEXTS = [
    "Hello, world! It's a test , with odd spacing  and\ttabs\n\nand new lines.",
    "你好，世界",
    "🙂👍🏽",
    "Mixed: café 中文 123 👨‍👩‍👧‍👦 🇫🇷 <tag> {json: [1, 2]}",
    "Never seen in training: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301 (a decomposed é stays decomposed)",
]
HF_FOLDER_FIXTURES = ["llama_path", "llama_gqa_path", "mistral_path", "qwen2_path", "demo_model_path"]
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _load_hf_model(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _folder_bytes(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tokenizer as the engine meets it: saved, then loaded back with AutoTokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_any_utf8(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing falls back to <unk>


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == demo_model.TOKENIZER_VOCAB_SIZE
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id  # Llama / InternLM2 style: bos prepended
    assert tokenizer.encode("a<|im_end|>b", add_special_tokens=False)[1] == 4  # special tokens are never split
    assert tokenizer.decode(tokenizer.encode("hi <|im_end|>"), skip_special_tokens=True) == "hi "


def test_chat_template_is_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好 🙂"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好 🙂<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt.endswith("<|im_end|>\n")
    ids = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_tokenizer_build_is_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert _folder_bytes(tmp_path / "a") == _folder_bytes(tmp_path / "b")


def test_factory_builds_are_deterministic(tmp_path):
    first = _folder_bytes(make_qwen2(tmp_path / "a", num_layers=1))
    second = _folder_bytes(make_qwen2(tmp_path / "b", num_layers=1))
    assert first.keys() == second.keys() and "model.safetensors" in first
    assert first == second
    other_seed = _folder_bytes(make_qwen2(tmp_path / "c", num_layers=1, seed=1))
    assert other_seed["model.safetensors"] != first["model.safetensors"]


@pytest.mark.parametrize("fixture_name", HF_FOLDER_FIXTURES)
def test_hf_folders_load_in_transformers_and_run(request, fixture_name):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(fixture_name)
    model = _load_hf_model(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert model.config.vocab_size == len(tokenizer)
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    generation_config = json.loads((path / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    input_ids = torch.tensor([tokenizer.encode("Hello 你好 🙂")])
    with torch.no_grad():
        logits = model(input_ids).logits  # [1, seq_len, vocab]
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.5  # unit-scale init: well spread logits, not transformers' near-uniform ones


def test_autotokenizer_agrees_with_tokenizer_json(qwen2_path, internlm2_paths):
    """transformers swaps in Qwen2Tokenizer for a qwen2 folder; ids must not change (NFC text)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = "The year 2024: it's 3.5x faster!  你好，世界 🙂👍🏽\n\nDone."
    for path in (qwen2_path, internlm2_paths[0]):
        raw_ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
        # trust_remote_code=False spelled out: the internlm2 config's auto_map otherwise triggers an input() prompt
        auto_ids = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False).encode(text)
        assert auto_ids == raw_ids


def test_demo_model_folder(demo_model_path):
    assert (demo_model_path / BUILD_MARKER).exists()
    assert "random" in (demo_model_path / "README.md").read_text()
    assert "random weights" in DEMO_MODEL_NOTE
    config = json.loads((demo_model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (128, 4, 2)
    assert not list(demo_model_path.parent.glob(".*.tmp-*"))  # the staging folder is gone

    mtime = (demo_model_path / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(demo_model_path) == demo_model_path  # complete: reused, not rebuilt
    assert (demo_model_path / "model.safetensors").stat().st_mtime_ns == mtime


def test_demo_model_replaces_an_older_recipe_and_spares_other_folders(tmp_path, demo_model_path):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"old")
    (stale / BUILD_MARKER).write_text(json.dumps({"recipe_version": demo_model.DEMO_MODEL_RECIPE_VERSION - 1}))
    assert build_demo_model(stale) == stale
    assert (stale / "model.safetensors").read_bytes() == (demo_model_path / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale"]  # no staging or stale leftovers

    foreign = tmp_path / "someone-elses-folder"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_demo_model(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_qwen2_has_biases_and_tied_embeddings(qwen2_path):
    weights = load_file(str(qwen2_path / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied: the folder holds the embedding only
    for name in ("q_proj", "k_proj", "v_proj"):
        assert weights[f"model.layers.0.self_attn.{name}.bias"].abs().min() > 0
    assert "model.layers.0.self_attn.o_proj.bias" not in weights


def test_sharded_llama_has_an_index_and_matches_unsharded(tmp_path, llama_path):
    sharded = make_llama(tmp_path / "sharded", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) >= 3 and not (sharded / "model.safetensors").exists()
    merged = {}
    for shard in shard_files:
        merged.update(load_file(str(sharded / shard)))
    reference = load_file(str(llama_path / "model.safetensors"))
    assert merged.keys() == reference.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[name], reference[name]) for name in reference)


def test_llama3_rope_scaling_in_both_config_styles(tmp_path):
    from transformers import AutoConfig

    new_style = make_llama(tmp_path / "new", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE_SCALING)
    legacy = make_llama(
        tmp_path / "legacy", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE_SCALING, legacy_config_keys=True
    )
    new_config = json.loads((new_style / "config.json").read_text())
    assert new_config["rope_parameters"] == {**LLAMA3_ROPE_SCALING, "rope_theta": 500000.0}
    assert "rope_scaling" not in new_config and "rope_theta" not in new_config
    legacy_config = json.loads((legacy / "config.json").read_text())
    assert legacy_config["rope_scaling"] == LLAMA3_ROPE_SCALING and legacy_config["rope_theta"] == 500000.0
    assert "rope_parameters" not in legacy_config and "dtype" not in legacy_config
    assert (
        AutoConfig.from_pretrained(str(legacy)).rope_parameters
        == AutoConfig.from_pretrained(str(new_style)).rope_parameters
    )


def _unpack_wqkv_row_by_row(wqkv, num_heads, num_kv_heads, head_dim):
    """Independent of model_factory.pack_wqkv: walk wqkv's rows in InternLM2's order and file each one."""
    q_per_kv = num_heads // num_kv_heads
    q_rows, k_rows, v_rows = [], [], []
    row = 0
    for kv_head in range(num_kv_heads):
        for slot in range(q_per_kv + 2):  # q heads of this group, then k, then v
            block = wqkv[row : row + head_dim]
            row += head_dim
            if slot < q_per_kv:
                q_rows.append((kv_head * q_per_kv + slot, block))
            elif slot == q_per_kv:
                k_rows.append((kv_head, block))
            else:
                v_rows.append((kv_head, block))
    assert row == wqkv.shape[0]
    by_head = lambda rows: torch.cat([block for _, block in sorted(rows, key=lambda item: item[0])])
    return by_head(q_rows), by_head(k_rows), by_head(v_rows)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_internlm2_holds_the_llama_reference_weights(tmp_path, num_heads, num_kv_heads):
    internlm2_path, reference_path = make_internlm2(tmp_path, heads=num_heads, num_kv_heads=num_kv_heads)
    config = json.loads((internlm2_path / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["architectures"] == ["InternLM2ForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "configuration_internlm2.InternLM2Config"
    assert config["bias"] is False and config["tie_word_embeddings"] is False
    assert config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert json.loads((internlm2_path / "generation_config.json").read_text())["eos_token_id"] == [2, 4]
    assert (internlm2_path / "tokenizer.json").exists()
    reference_config = json.loads((reference_path / "config.json").read_text())
    assert reference_config["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    assert reference_config["vocab_size"] == config["vocab_size"]

    internlm2 = load_file(str(internlm2_path / "model.safetensors"))
    llama = load_file(str(reference_path / "model.safetensors"))
    head_dim = config["hidden_size"] // num_heads
    renames = {
        "model.tok_embeddings.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for i in range(config["num_hidden_layers"]):
        internlm2_layer, llama_layer = f"model.layers.{i}.", f"model.layers.{i}."
        q, k, v = _unpack_wqkv_row_by_row(
            internlm2[internlm2_layer + "attention.wqkv.weight"], num_heads, num_kv_heads, head_dim
        )
        assert torch.equal(q, llama[llama_layer + "self_attn.q_proj.weight"])
        assert torch.equal(k, llama[llama_layer + "self_attn.k_proj.weight"])
        assert torch.equal(v, llama[llama_layer + "self_attn.v_proj.weight"])
        for internlm2_name, llama_name in {
            "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight",
            "feed_forward.w2.weight": "mlp.down_proj.weight",
            "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight",
        }.items():
            renames[internlm2_layer + internlm2_name] = llama_layer + llama_name
    wqkv_names = {f"model.layers.{i}.attention.wqkv.weight" for i in range(config["num_hidden_layers"])}
    assert set(internlm2) == set(renames) | wqkv_names
    for internlm2_name, llama_name in renames.items():
        assert torch.equal(internlm2[internlm2_name], llama[llama_name]), internlm2_name


def test_internlm2_reference_runs_in_transformers(internlm2_paths):
    model = _load_hf_model(internlm2_paths[1])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 100, 200, 300]])).logits
    assert torch.isfinite(logits).all()
