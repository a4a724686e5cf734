"""Tiny, randomly initialised CLIP and BLIP checkpoints built with the real ``transformers`` classes.

Real CLIP/BLIP weights (hundreds of MB) cannot reach the machines that run the tests, so the tests build
checkpoints with the same classes and file layout from small configurations, with tokenizers made from a
vocabulary written here, and load them through the very ``from_pretrained(local_dir)`` path that real
weights take. Their captions are gibberish and their similarities meaningless; the plumbing is real.

Use ``build_tiny_clip(dir)`` / ``build_tiny_blip(dir)``; both return the checkpoint directory and reuse a
complete one that is already there, so a session-scoped fixture builds each once.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from stages.torch_compat import ensure_torchvision

IMAGE_SIZE = 32  # the vision towers see 32x32 images: 4x4 patches of 8 pixels
HIDDEN = 32
LAYERS = 2
HEADS = 4

# Words the BLIP tokenizer knows whole; anything else falls back to characters or [UNK].
_WORDS = [
    *("a", "an", "the", "of", "in", "on", "with", "and", "is", "are", "picture", "photo", "image"),
    *("man", "woman", "person", "people", "dog", "cat", "bird", "car", "bus", "truck", "bicycle", "street"),
    *("sign", "text", "document", "page", "paper", "table", "red", "blue", "green", "white", "black", "two"),
]
_MARKER = "config.json"


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


def build_tiny_clip(directory: Path) -> Path:
    """Save a tiny random ``CLIPModel`` + ``CLIPProcessor`` to ``directory`` and return it."""
    directory = Path(directory)
    if (directory / _MARKER).is_file() and (directory / "processor_config.json").is_file():
        return directory
    ensure_torchvision()
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        write_clip_vocabulary(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **_tiny_encoder(),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_tiny_encoder(image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def _tiny_encoder(**extra: int) -> dict[str, int]:
    """The transformer size shared by every tiny text and vision tower."""
    return {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, **extra}


def build_tiny_blip(directory: Path) -> Path:
    """Save a tiny random ``BlipForConditionalGeneration`` + ``BlipProcessor`` to ``directory``; return it."""
    directory = Path(directory)
    if (directory / _MARKER).is_file() and (directory / "processor_config.json").is_file():
        return directory
    ensure_torchvision()
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    with tempfile.TemporaryDirectory() as scratch:
        write_bert_vocabulary(Path(scratch))
        tokenizer = BertTokenizer.from_pretrained(scratch, bos_token="[DEC]", model_max_length=64)
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **_tiny_encoder(),
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_tiny_encoder(image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory
