"""Tiny, randomly initialised captioning models for the tests and `vidlens doctor`, built offline.

Each builder writes a complete Hugging Face model folder (config, safetensors weights, an
offline BERT WordPiece tokenizer and an image processor, combined into the model's processor
class) that the product loads through the same `from_pretrained` path as a real checkpoint.
The captions they produce are random words; what they prove is that loading, preprocessing,
batched generation and decoding work end to end without a network.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: the image side of every tiny model: 32x32 pixels in 16x16 patches, so 4 patches a frame.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 16
#: CLIP's mean/std, which GIT and BLIP both use.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: std of the random weights: wide enough that different frames give different captions.
_WEIGHT_STD = 0.15

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: BLIP starts decoding from its own [DEC] token (as the real checkpoint does).
_BLIP_DECODER_TOKEN = "[DEC]"
_COMMON_WORDS = (
    "a", "an", "the", "is", "are", "of", "in", "on", "at", "with", "and", "to", "man", "woman",
    "person", "people", "video", "shows", "playing", "standing", "walking", "sitting", "red",
    "green", "blue", "yellow", "white", "black", "room", "street", "car", "dog", "cat", "text",
    "screen", "square", "moving", "background", "colour", "color", "scene", "outside", "inside",
)


def tiny_vocab(extra_special: tuple[str, ...] = ()) -> dict[str, int]:
    """A WordPiece vocabulary in which any lowercase English text tokenises without [UNK].

    Single letters and digits (and their ## continuations) guarantee coverage; common words
    keep captions of real-looking text short.
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = list(".,!?'\"-:;()")
    tokens = [*_SPECIAL_TOKENS, *extra_special, *letters, *(f"##{t}" for t in letters), *punctuation]
    tokens += [w for w in _COMMON_WORDS if w not in tokens]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_git(folder: str | Path, num_frames: int | None = 6, seed: int = 0) -> Path:
    """Write a tiny random GIT captioner (video-capable when num_frames is set) to `folder`.

    Mirrors microsoft/git-base-vatex in structure: GitForCausalLM with `num_frames` temporal
    embeddings, a CLIP image processor and a BERT tokenizer, generation from [CLS] to [SEP].
    `num_frames=None` gives an image-only GIT (like git-base-coco).
    """
    from transformers import BertTokenizer, CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor

    folder = Path(folder)
    vocab = tiny_vocab()
    tokenizer = _write_tokenizer(BertTokenizer, folder, vocab)
    config = GitConfig(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE, "patch_size": TINY_PATCH_SIZE,
        },
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
        pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"],
        num_image_with_embedding=num_frames,
    )
    model = _seeded(lambda: GitForCausalLM(config), seed)
    _align_generation(model, bos=vocab["[CLS]"], eos=vocab["[SEP]"], pad=vocab["[PAD]"])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD),
    )
    return _save(folder, model, GitProcessor(image_processor=image_processor, tokenizer=tokenizer))


def build_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random BLIP image captioner (single image) to `folder`.

    Mirrors Salesforce/blip-image-captioning-base in structure: BlipForConditionalGeneration
    decoding from a [DEC] token to [SEP], a BLIP image processor and a BERT tokenizer.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil
    from transformers import BlipProcessor

    folder = Path(folder)
    vocab = tiny_vocab(extra_special=(_BLIP_DECODER_TOKEN,))
    # [DEC] is the tokenizer's bos token, so skip_special_tokens removes it from captions
    tokenizer = _write_tokenizer(BertTokenizer, folder, vocab, bos_token=_BLIP_DECODER_TOKEN)
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "encoder_hidden_size": 32,
            "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": vocab[_BLIP_DECODER_TOKEN], "eos_token_id": vocab["[SEP]"],
            "sep_token_id": vocab["[SEP]"], "pad_token_id": vocab["[PAD]"],
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE, "patch_size": TINY_PATCH_SIZE,
        },
        projection_dim=32, image_text_hidden_size=32,
    )
    model = _seeded(lambda: BlipForConditionalGeneration(config), seed)
    _align_generation(model, bos=vocab[_BLIP_DECODER_TOKEN], eos=vocab["[SEP]"], pad=vocab["[PAD]"])
    image_processor = BlipImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD),
    )
    return _save(folder, model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer))


def _write_tokenizer(tokenizer_class, folder: Path, vocab: dict[str, int], **special):
    """Write vocab.txt (one token a line, in id order) and load a BERT tokenizer from it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab))
    return tokenizer_class.from_pretrained(str(folder), do_lower_case=True, **special)


def _seeded(build, seed: int):
    """Build a model with fixed random weights, without disturbing the caller's random state.

    The default initialisation (std 0.02, BLIP's vision tower 1e-10) leaves a tiny model blind:
    every image gets the same caption, and a test could not catch a preprocessing mistake.
    Wider weights make the caption depend on the pixels.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build().eval()
        with torch.no_grad():
            for parameter in model.parameters():
                # matrices, convolutions and embeddings; biases and layer norms keep their init
                if parameter.ndim >= 2:
                    parameter.normal_(0.0, _WEIGHT_STD)
        return model


def _align_generation(model, bos: int, eos: int, pad: int) -> None:
    # generation stops only where generation_config agrees with the tokenizer's ids
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = bos, eos, pad
    generation.decoder_start_token_id = None


def _save(folder: Path, model, processor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
