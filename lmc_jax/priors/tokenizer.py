"""An offline byte-level CLIP tokenizer, for priors that ship no tokenizer of their own.

CLIP's BPE first maps every UTF-8 byte to one printable unicode character, then merges those
characters into learned sub-words. With no merges at all, every word becomes its byte characters,
the last one carrying CLIP's end-of-word suffix '</w>'. The vocabulary is therefore
256 byte characters + the same 256 with '</w>' + '<|startoftext|>' + '<|endoftext|>' = 514 ids,
and ANY text tokenizes with no unknown token. Ids 0..511 coincide with the first 512 ids of the
real CLIP vocabulary (same byte order); only the two special tokens differ (512, 513 here).

The files are those `transformers.CLIPTokenizer.from_pretrained(directory)` reads.
`write_byte_tokenizer` writes them; `byte_tokenizer_path()` is the copy shipped with lmc_jax
(regenerate it with `python -m lmc_jax.priors.tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"


def byte_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Bytes that are already printable, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ')
    map to themselves; the other 68 (controls, space, NBSP, soft hyphen) map, in increasing
    byte order, to the code points 256, 257, ... The dict's order is CLIP's vocabulary order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    for n, b in enumerate(others):
        mapping[b] = chr(256 + n)
    return mapping


def byte_vocab() -> dict[str, int]:
    """The 514-token vocabulary: byte characters, then with '</w>', then the two specials."""
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_byte_tokenizer(directory: str | Path, model_max_length: int = 77) -> Path:
    """Writes vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.

    Returns the directory. The output is deterministic (same bytes every time).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(model_max_length),
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    files = {
        "vocab.json": json.dumps(byte_vocab(), ensure_ascii=False),
        "merges.txt": MERGES_HEADER,  # a header line and no merges: pure byte-level BPE
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True),
        "special_tokens_map.json": json.dumps(specials, indent=2, sort_keys=True),
    }
    for name, text in files.items():
        (out / name).write_text(text + "\n", encoding="utf-8")
    return out


def byte_tokenizer_path() -> Path:
    """Directory of the byte tokenizer shipped in `lmc_jax/assets/byte_tokenizer/`."""
    return Path(__file__).resolve().parent.parent / "assets" / "byte_tokenizer"


if __name__ == "__main__":
    print(write_byte_tokenizer(byte_tokenizer_path()))
