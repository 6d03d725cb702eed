"""Tiny random video-text models built offline, for the tests and `vidlens doctor`.

Each builder writes a complete Hugging Face model folder (config, safetensors weights,
tokenizer, image processor, processor) with `save_pretrained`, so the product loads it
through exactly the code path it uses for a real checkpoint. The weights are random (fixed
seed) and the models are a few hundred kilobytes: they check plumbing, not understanding.

No network is used. The tokenizers are built with the `tokenizers` library:
- CLIP and X-CLIP: CLIP's own byte-level BPE over a vocabulary of the 256 byte symbols
  (alone and as word ends, "</w>") plus a few merges, so any text encodes.
- SigLIP: a Unigram model over "▁"-prefixed single characters with byte fallback (as
  SentencePiece does), wrapped as a fast tokenizer, padded to the text length with "</s>".
"""

from __future__ import annotations

from pathlib import Path

import torch

#: sizes shared by every tiny model: small enough to build in well under a second.
_HIDDEN = 32
_LAYERS = 2
_HEADS = 2
_INTERMEDIATE = 64
_PROJECTION = 16
_IMAGE_SIZE = 32
_PATCH = 8
_TEXT_POSITIONS = 77
#: SigLIP pads every text to this length (its `max_position_embeddings`).
_SIGLIP_TEXT_LENGTH = 16
#: frames per clip of the tiny X-CLIP (the real ones use 8 or 16).
XCLIP_TINY_FRAMES = 4
_SEED = 0

#: frequent English letter pairs, merged so common words become a few tokens.
_CLIP_MERGES = ("t h", "h e", "i n", "a n", "e r", "o n", "r e", "a t", "o r", "e n")


def build_tiny_clip(folder: str | Path) -> Path:
    """A tiny random CLIPModel with its tokenizer and processor, saved into `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer),
        vision_config=_vision_config(),
        projection_dim=_PROJECTION,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(CLIPModel, config, processor, folder)


def build_tiny_siglip(folder: str | Path) -> Path:
    """A tiny random SiglipModel with a Unigram byte-fallback tokenizer, saved into `folder`."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    tokenizer = _siglip_tokenizer()
    config = SiglipConfig(
        text_config={
            **_text_sizes(),
            "vocab_size": len(tokenizer),
            "max_position_embeddings": _SIGLIP_TEXT_LENGTH,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
            "projection_size": _HIDDEN,
        },
        vision_config=_vision_config(),
    )
    image_processor = SiglipImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def calibrate(model: torch.nn.Module) -> None:
        """Give the random model a plausible logit scale and bias."""
        # SigLIP's init zeroes these; trained checkpoints have a scale near 10 and a strongly negative bias
        with torch.no_grad():
            model.logit_scale.fill_(2.3)
            model.logit_bias.fill_(-5.0)

    return _save(SiglipModel, config, processor, folder, calibrate)


def build_tiny_xclip(folder: str | Path) -> Path:
    """A tiny random XCLIPModel (clips of `XCLIP_TINY_FRAMES` frames), saved into `folder`."""
    from transformers import VideoMAEImageProcessorPil, XCLIPConfig, XCLIPModel, XCLIPProcessor

    tokenizer = _clip_tokenizer()
    vision = _vision_config()
    vision.update(
        num_frames=XCLIP_TINY_FRAMES,
        mit_hidden_size=_PROJECTION,
        mit_intermediate_size=2 * _PROJECTION,
        mit_num_hidden_layers=1,
        mit_num_attention_heads=2,
    )
    text = _clip_text_config(tokenizer)
    text.pop("projection_dim")
    config = XCLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=_PROJECTION,
        prompt_layers=1,
        prompt_num_attention_heads=2,
    )
    # the released X-CLIP checkpoints ship VideoMAE's image processor, which returns a clip axis
    image_processor = VideoMAEImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = XCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(XCLIPModel, config, processor, folder)


def _text_sizes() -> dict:
    return {
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
    }


def _vision_config() -> dict:
    return {
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "image_size": _IMAGE_SIZE,
        "patch_size": _PATCH,
        "projection_dim": _PROJECTION,
    }


def _clip_text_config(tokenizer) -> dict:
    return {
        **_text_sizes(),
        "vocab_size": len(tokenizer),
        "max_position_embeddings": _TEXT_POSITIONS,
        "projection_dim": _PROJECTION,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def _clip_tokenizer():
    """CLIP's byte-level BPE with a vocabulary of single bytes, byte word-ends and a few merges."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    pairs = [tuple(merge.split()) for merge in _CLIP_MERGES]
    # each pair is merged inside a word and at its end ("t" + "h</w>" -> "th</w>")
    merges = pairs + [(left, right + "</w>") for left, right in pairs]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    # special tokens last, as in the real CLIP vocabulary
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_TEXT_POSITIONS)


def _siglip_tokenizer():
    """A SentencePiece-style Unigram tokenizer with byte fallback, so any text encodes."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"<0x{byte:02X}>", -20.0) for byte in range(256)]
    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"
    pieces += [("▁" + c, -3.0) for c in characters] + [(c, -4.0) for c in characters] + [("▁", -5.0)]
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=True))
    # SigLIP's tokenizer lowercases; Metaspace marks word starts with "▁" as SentencePiece does
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=_SIGLIP_TEXT_LENGTH,
    )


def _save(model_class, config, processor, folder: str | Path, adjust=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(_SEED)
    model = model_class(config).eval()
    if adjust is not None:
        adjust(model)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
