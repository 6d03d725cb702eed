"""Full-size default architectures with random weights, built offline, for the benchmarks.

Throughput depends on a model's shape, not on its weights, so the benchmarks build the
default models from their published configuration values (CLIP ViT-B/32 as
openai/clip-vit-base-patch32, GIT-base as microsoft/git-base-vatex) with random weights,
and save them with `save_pretrained` so the pipeline loads them exactly as it loads the real
checkpoints. CLIP's tokenizer is CLIP's own byte-level BPE, built from the merges OpenAI
published, which open_clip's wheel carries (`clip_tokenizer`: fetched from the package index
once, nothing installed), so its prompts are as many tokens long as with the real checkpoint:
the text encoder's cost grows with them. Where the index cannot be reached, and for GIT, the
tokenizers are the offline ones of the tiny test models (`workers.tiny_models`,
`workers.tiny_captions`): their ids fit the full vocabularies, but they cut words into more
tokens (22 a prompt of the default label vocabularies against CLIP's 9). No weights are
downloaded.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from bench.common import CACHE

#: openai/clip-vit-base-patch32's config.json, the values that set its cost.
CLIP_B32 = {
    "text": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 8, "max_position_embeddings": 77},
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
    "projection_dim": 512,
}
#: microsoft/git-base-vatex's config.json: a CLIP ViT-B/16 image encoder, a 6-layer BERT-base decoder.
GIT_BASE_VATEX = {
    "text": {"vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 6,
             "num_attention_heads": 12, "max_position_embeddings": 1024},
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
    "num_image_with_embedding": 6,
}
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_SEED = 0
#: the wheel carrying CLIP's BPE merges (open_clip/bpe_simple_vocab_16e6.txt.gz, OpenAI's file)
_BPE_WHEEL = "open_clip_torch==3.3.0"
_BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
#: merges CLIP's vocabulary takes from that file (49,408 tokens: 512 bytes, these, 2 special)
_BPE_MERGES = 49152 - 256 - 2


def fullsize_clip(folder: Path | None = None, own_tokenizer: bool = True) -> Path:
    """A CLIP ViT-B/32-sized CLIPModel with random weights, saved once under the cache; with
    CLIP's own tokenizer where it can be built (`clip_tokenizer`), else the tiny test one."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from workers.tiny_models import _clip_tokenizer

    bpe = clip_tokenizer() if own_tokenizer else None
    folder = folder or CACHE / "models" / f"clip-vit-base-patch32-random{'-bpe' if bpe else ''}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = bpe or _clip_tokenizer()
    tokenizer.model_max_length = CLIP_B32["text"]["max_position_embeddings"]
    config = CLIPConfig(
        text_config={**CLIP_B32["text"], "projection_dim": CLIP_B32["projection_dim"],
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**CLIP_B32["vision"], "projection_dim": CLIP_B32["projection_dim"]},
        projection_dim=CLIP_B32["projection_dim"],
    )
    size = CLIP_B32["vision"]["image_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
    )
    return _save(CLIPModel(_seeded(config)), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer),
                 folder)


def clip_tokenizer():
    """CLIP's own tokenizer (49,408 tokens) from the BPE merges in open_clip's wheel, fetched with
    pip once into the cache, without its dependencies; None where pip cannot fetch it (no package
    index: the GPU machines, unless bench/.cache/clip-bpe is carried there)."""
    from transformers import CLIPTokenizer

    from workers.tiny_models import _byte_symbols

    merges_file = CACHE / "clip-bpe" / "merges.txt"
    if not merges_file.exists():
        with tempfile.TemporaryDirectory() as wheels:
            # (few retries: a machine without a package index gives up in seconds, not minutes)
            fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1",
                                      "--timeout", "10", "--dest", wheels, _BPE_WHEEL],
                                     capture_output=True, text=True, timeout=120)
            if fetched.returncode != 0:
                print(f"CLIP's BPE merges not fetched ({_BPE_WHEEL}): the tiny test tokenizer is used\n"
                      f"{fetched.stderr.strip()[-300:]}", file=sys.stderr)
                return None
            [wheel] = Path(wheels).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                lines = gzip.decompress(archive.read(_BPE_FILE)).decode().split("\n")
        merges_file.parent.mkdir(parents=True, exist_ok=True)
        merges_file.with_suffix(".partial").write_text("\n".join(lines[1 : 1 + _BPE_MERGES]))
        merges_file.with_suffix(".partial").rename(merges_file)
    merges = [tuple(line.split()) for line in merges_file.read_text().split("\n")]
    symbols = _byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(pair) for pair in merges]
    vocab = {token: index for index, token in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges)


def fullsize_git(folder: Path | None = None) -> Path:
    """A GIT-base (VATEX, 6 frames) sized GitForCausalLM with random weights, saved once under the cache."""
    from transformers import BertTokenizer, CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor

    from workers.tiny_captions import _align_generation, _write_tokenizer, tiny_vocab

    folder = folder or CACHE / "models" / "git-base-vatex-random"
    if (folder / "config.json").exists():
        return folder
    vocab = tiny_vocab()
    tokenizer = _write_tokenizer(BertTokenizer, folder, vocab)
    config = GitConfig(
        vision_config=GIT_BASE_VATEX["vision"], **GIT_BASE_VATEX["text"],
        num_image_with_embedding=GIT_BASE_VATEX["num_image_with_embedding"],
        pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"],
    )
    model = GitForCausalLM(_seeded(config))
    _align_generation(model, bos=vocab["[CLS]"], eos=vocab["[SEP]"], pad=vocab["[PAD]"])
    size = GIT_BASE_VATEX["vision"]["image_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
    )
    return _save(model, GitProcessor(image_processor=image_processor, tokenizer=tokenizer), folder)


def _seeded(config):
    """Seed torch so the random weights (and hence the benchmark's captions) are the same every build."""
    torch.manual_seed(_SEED)
    return config


def _save(model: torch.nn.Module, processor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(fullsize_clip())
    print(fullsize_git())
