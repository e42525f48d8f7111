"""Writes the quantized Hugging Face folder in the AutoAWQ GEMM format.

Contents: `model.safetensors` (or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` when larger
than the shard size) with `<linear>.qweight` int32 [in, out/8], `<linear>.qzeros` int32 [in/G, out/8],
`<linear>.scales` fp16 [in/G, out], biases fp16, and every other weight as it was (scales folded into the norms)
in fp16; `config.json` copied with `quantization_config` = {quant_method: awq, bits, group_size, zero_point: true,
version: gemm, modules_to_not_convert}; the tokenizer, chat template, generation config and any custom code files
copied as they are; and `quant_report.json`.

The folder is written under a hidden temporary sibling and renamed into place at the very end, so a cancelled or
failed run never leaves a folder that looks complete; the staging folders of a killed run are deleted by the next
run that writes next to them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from engine.checkpoint import checkpoint_files
from engine.models.internlm2 import llama_to_internlm2_name, merge_wqkv
from engine.staging import clean_stale_staging, is_staging_dir, staged_folder  # noqa: F401 - re-exported
from quant.awq import QuantizedLinear
from quant.primitives import pack_awq
from quant.source_model import SourceModel

OUT_DTYPE = torch.float16  # the AutoAWQ GEMM format computes in fp16
DEFAULT_SHARD_BYTES = 4 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WRITTEN_HERE = ("config.json", "quant_report.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class AWQStateCollector:
    """Receives each layer's integer tensors as soon as the layer is done, packs them (on the layer's device,
    then to CPU), and at the end adds the non-quantized weights; names follow the source checkpoint's layout."""

    def __init__(self, loaded: SourceModel, w_bits: int):
        self.loaded = loaded
        self.w_bits = w_bits
        self.tensors: dict[str, torch.Tensor] = {}
        self.quantized_modules: set[str] = set()  # Llama-layout names, to skip in the fp state dict
        tc = loaded.text_config
        self.num_heads = tc.get("num_attention_heads")
        self.num_kv_heads = tc.get("num_key_value_heads") or self.num_heads

    def add_layer(self, layer_index: int, records: list[QuantizedLinear]) -> None:
        self.quantized_modules.update(r.name for r in records)
        if self.loaded.source_format == "internlm2":
            records = self._to_internlm2(records)
        rename = self.loaded.export_name or (lambda n: n)
        for r in records:
            qweight, qzeros, scales = pack_awq(r.q, r.scales, r.zeros, self.w_bits)
            name = rename(r.name)
            self.tensors[f"{name}.qweight"] = qweight.cpu()
            self.tensors[f"{name}.qzeros"] = qzeros.cpu()
            self.tensors[f"{name}.scales"] = scales.cpu()
            if r.bias is not None:
                self.tensors[f"{name}.bias"] = r.bias.to(OUT_DTYPE).cpu()

    def _to_internlm2(self, records: list[QuantizedLinear]) -> list[QuantizedLinear]:
        by_name = {r.name: r for r in records}
        out = []
        for r in records:
            if r.name.endswith((".k_proj", ".v_proj")):
                continue
            if r.name.endswith(".q_proj"):
                prefix = r.name[: -len(".self_attn.q_proj")]
                k, v = by_name[f"{prefix}.self_attn.k_proj"], by_name[f"{prefix}.self_attn.v_proj"]
                merge = lambda a, b, c: merge_wqkv(a, b, c, self.num_heads, self.num_kv_heads)  # noqa: E731
                bias = merge(r.bias, k.bias, v.bias) if r.bias is not None else None
                out.append(
                    QuantizedLinear(
                        f"{prefix}.attention.wqkv",
                        merge(r.q, k.q, v.q),
                        merge(r.scales, k.scales, v.scales),
                        merge(r.zeros, k.zeros, v.zeros),
                        bias,
                    )
                )
            else:
                out.append(QuantizedLinear(llama_to_internlm2_name(r.name), r.q, r.scales, r.zeros, r.bias))
        return out

    def finish(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Adds every non-quantized weight (norms with folded scales, embeddings, lm_head) in fp16, and a LLaVA's
        vision tower / projector / image_newline as the checkpoint had them (fp16 and bf16 byte for byte, fp32 as
        fp16).

        A tensor sharing storage with one already added (tied lm_head) is left out, as save_pretrained does."""
        rename = self.loaded.export_name or (lambda n: n)
        seen: set[int] = set()
        for name, t in model.state_dict().items():
            module = name.rpartition(".")[0]
            if module in self.quantized_modules or "rotary_emb" in name:
                continue
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if self.loaded.source_format == "internlm2":
                name = llama_to_internlm2_name(name)
            t = t.detach()
            self.tensors[rename(name)] = (t.to(OUT_DTYPE) if t.is_floating_point() else t).contiguous().clone()
        for name, t in self.loaded.kept_tensors.items():
            if t.dtype not in (torch.float16, torch.bfloat16) and t.is_floating_point():
                t = t.to(OUT_DTYPE)
            self.tensors[name] = t.contiguous()
        return self.tensors

    def modules_to_not_convert(self, model: torch.nn.Module) -> list[str]:
        """Linears left in fp16: lm_head, and in multimodal models the vision tower / projector (by their root)."""
        names = set()
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name in self.quantized_modules:
                continue
            parts = name.split(".")
            root = next((i for i, p in enumerate(parts) if "vision" in p or "projector" in p), None)
            key = ".".join(parts[: root + 1]) if root is not None else name
            if self.loaded.source_format == "internlm2":
                key = llama_to_internlm2_name(key)
            names.add(key)
        names.update(self.loaded.keep_modules)  # LLaVA: the vision tower and projector, outside `model`
        return sorted(names)


def quantization_config(w_bits: int, group_size: int, modules_to_not_convert: list[str]) -> dict:
    return {
        "quant_method": "awq",
        "bits": w_bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes through a private (0600) temp file; the folder is meant to be shared


def write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        path = out_dir / "model.safetensors"
        _save_file(shards[0], path)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, out_dir / fname)
        paths.append(out_dir / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template, generation config, custom code, processor configs: every top-level file that is
    not a weight file nor one this writer makes itself."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in WRITTEN_HERE:
            continue
        if f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def write_config(src_config: dict, dst: Path, quant_cfg: dict) -> dict:
    cfg = json.loads(json.dumps(src_config))  # a deep copy that keeps custom keys (auto_map, ...)
    cfg["quantization_config"] = quant_cfg
    cfg["torch_dtype"] = "float16"
    if "dtype" in cfg:
        cfg["dtype"] = "float16"
    if isinstance(cfg.get("text_config"), dict):
        for key in ("torch_dtype", "dtype"):
            if key in cfg["text_config"]:
                cfg["text_config"][key] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def source_weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(path))


@contextmanager
def staged_output_dir(work_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a hidden temporary sibling of work_dir to write into; on normal exit it replaces work_dir, on any
    exception (cancellation, Ctrl-C) it is deleted and work_dir is left as it was."""
    target = Path(work_dir).expanduser().resolve()
    check_output_dir(target, overwrite)
    with staged_folder(target) as tmp:
        yield tmp


def check_output_dir(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--work-dir {target} exists and is a file")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--work-dir {target} exists and is not empty; pass --overwrite (overwrite=True) to replace it"
        )
