"""A dequantizing reference loader for AutoAWQ-GEMM folders: every `<linear>.qweight/.qzeros/.scales` triple
becomes a plain nn.Linear weight again, in a `transformers` model: the tests' reference for what the quantizer
wrote (the engine runs those folders through its own W4A16 kernels); InternLM2 folders come back as the
equivalent LlamaForCausalLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import iter_checkpoint
from quant.primitives import dequantize_awq
from quant.source_model import (
    internlm2_llama_config,
    internlm2_to_llama_tensors,
    internvl_layout,
    llava_layout,
    qwen_vl_layout,
)


def dequantized_state_dict(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The folder's tensors with each qweight/qzeros/scales triple replaced by `<linear>.weight` [out, in]."""
    raw = dict(iter_checkpoint(Path(path)))
    state = {}
    for name, t in raw.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            state[f"{prefix}.weight"] = dequantize_awq(t, raw[f"{prefix}.qzeros"], raw[f"{prefix}.scales"], dtype)
        elif name.endswith((".qzeros", ".scales")):
            continue
        else:
            state[name] = t.to(dtype) if t.is_floating_point() else t
    return state


def load_awq_as_fp(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """AWQ folder -> transformers model (eval mode, CPU) holding the dequantized weights."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    qcfg = cfg.pop("quantization_config", None) or {}
    if qcfg.get("quant_method") != "awq" or qcfg.get("version", "gemm").lower() != "gemm":
        raise ValueError(f"{path} is not an AutoAWQ GEMM folder (quantization_config: {qcfg})")
    state = dequantized_state_dict(path, dtype)
    if llava_layout(cfg) == "hf" or qwen_vl_layout(cfg) or internvl_layout(cfg) == "hf":
        return _llava_as_fp(path, cfg, state, dtype)
    if cfg.get("model_type") == "internlm2":
        from transformers import LlamaForCausalLM

        config = internlm2_llama_config(cfg)
        state = dict(internlm2_to_llama_tensors(iter(state.items()), cfg))
        model = LlamaForCausalLM(config)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**cfg)
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m and m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if "lm_head.weight" not in state:  # tied embeddings: the folder stores only the input embedding
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model.eval()


def _llava_as_fp(path: Path, cfg: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A llava-hf AWQ folder -> transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration
    with the dequantized language model (saved to a temporary folder and read back, so transformers maps every
    weight spelling itself)."""
    import shutil
    import tempfile

    import transformers
    from safetensors.torch import save_file

    arch = next(a for a in cfg.get("architectures") or [] if a.startswith(("Llava", "Qwen2", "InternVL")))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        for name in ("preprocessor_config.json",):
            if (path / name).is_file():
                shutil.copy2(path / name, Path(tmp) / name)
        return getattr(transformers, arch).from_pretrained(tmp, dtype=dtype).eval()
