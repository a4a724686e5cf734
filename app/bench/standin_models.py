"""Randomly initialised checkpoints of the real model architectures, for machines without the real weights.

Real BLIP and CLIP weights (hundreds of MB) reach neither the development machines nor the rented GPU
machines, so benchmarks and tests build checkpoints with the real ``transformers`` classes and file layout,
with tokenizers made from a vocabulary written here, and load them through the very
``from_pretrained(local_dir)`` path that real weights take. ``size="base"`` gives the real architectures
(BLIP base, CLIP ViT-B/32): their throughput and memory are the real ones, their captions are gibberish.
``size="tiny"`` gives 32-pixel, 2-layer models for fast tests. YOLO: ``build_yolo`` saves an Ultralytics
YOLOv8n built from its shipped model description, randomly initialised.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

Size = Literal["tiny", "base"]

TINY_IMAGE_SIZE = 32  # the tiny vision towers see 32x32 images: 4x4 patches of 8 pixels
_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_MARKER = "config.json"

# Words the BLIP tokenizer knows whole; anything else falls back to characters or [UNK].
_WORDS = [
    *("a", "an", "the", "of", "in", "on", "with", "and", "is", "are", "picture", "photo", "image"),
    *("man", "woman", "person", "people", "dog", "cat", "bird", "car", "bus", "truck", "bicycle", "street"),
    *("sign", "text", "document", "page", "paper", "table", "red", "blue", "green", "white", "black", "two"),
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's byte-level BPE uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def write_clip_vocabulary(directory: Path) -> None:
    """A byte-level BPE vocabulary with no merges: every byte, alone and as a word end (``</w>``)."""
    symbols = sorted(_bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def write_bert_vocabulary(directory: Path) -> None:
    """A WordPiece vocabulary: BERT's specials, BLIP's ``[DEC]``, some words, letters and digits."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)] + [str(digit) for digit in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *_WORDS, *letters]
    tokens += [f"##{char}" for char in letters] + [".", ",", "!", "?", "'", "-"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")


def _complete(directory: Path) -> bool:
    return (directory / _MARKER).is_file() and (directory / "processor_config.json").is_file()


def build_clip(directory: Path, size: Size = "tiny") -> Path:
    """Save a random ``CLIPModel`` + ``CLIPProcessor`` (tiny, or the ViT-B/32 architecture) and return the folder."""
    directory = Path(directory)
    if _complete(directory):
        return directory
    from stages.torch_compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        write_clip_vocabulary(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if size == "tiny":
        config = CLIPConfig(
            text_config={"vocab_size": len(tokenizer), **_TINY, "max_position_embeddings": 77, **special},
            vision_config={**_TINY, "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
            projection_dim=16,
        )
        image_size = TINY_IMAGE_SIZE
    else:  # transformers' CLIPConfig defaults are openai/clip-vit-base-patch32
        config = CLIPConfig(text_config=special)
        image_size = int(config.vision_config.image_size)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def build_blip(directory: Path, size: Size = "tiny") -> Path:
    """Save a random ``BlipForConditionalGeneration`` + ``BlipProcessor`` (tiny, or BLIP base); return the folder."""
    directory = Path(directory)
    if _complete(directory):
        return directory
    from stages.torch_compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    with tempfile.TemporaryDirectory() as scratch:
        write_bert_vocabulary(Path(scratch))
        tokenizer = BertTokenizer.from_pretrained(scratch, bos_token="[DEC]", model_max_length=64)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.sep_token_id,
               "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
    text: dict[str, Any]
    if size == "tiny":
        text = {"vocab_size": len(tokenizer), **_TINY, "max_position_embeddings": 64}
        vision: dict[str, Any] = {**_TINY, "image_size": TINY_IMAGE_SIZE, "patch_size": 8}
        config = BlipConfig(text_config={**text, **special}, vision_config=vision, projection_dim=16)
        image_size = TINY_IMAGE_SIZE
    else:  # BlipConfig defaults are Salesforce/blip-image-captioning-base (ViT-B/16 at 384 px, BERT-base decoder)
        config = BlipConfig(text_config=special)
        image_size = int(config.vision_config.image_size)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def build_yolo(path: Path, architecture: str = "yolov8n.yaml") -> Path:
    """Save a randomly initialised Ultralytics detector (YOLOv8n by default) as a ``.pt`` file; return it."""
    path = Path(path)
    if path.is_file():
        return path
    from stages.ultralytics_env import prepare_ultralytics

    prepare_ultralytics()
    from ultralytics import YOLO

    path.parent.mkdir(parents=True, exist_ok=True)
    YOLO(architecture, task="detect").save(str(path))
    return path
