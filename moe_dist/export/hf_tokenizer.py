"""The run's tokenizer as Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``).

``AutoTokenizer.from_pretrained(OUT_DIR)`` then gives a ``PreTrainedTokenizerFast`` (a
``tokenizers`` backend) that encodes to the ids the model was trained on:

- ``data.tokenizer.kind: hf``: the run's ``tokenizer.json`` is copied as it is; its EOS (the one
  ``moe_dist.data.tokenizer.HFTokenizer`` found) becomes ``eos_token``.
- ``kind: bytes``: a byte-level BPE without merges whose token id is the byte's value (GPT-2's
  byte-to-unicode alphabet, ``ByteLevel`` pre-tokenizer without regex splitting or prefix space,
  ``ByteLevel`` decoder), so it encodes exactly as ``ByteTokenizer`` (UTF-8 bytes) does. No EOS,
  as ours has none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moe_dist.data.tokenizer import HFTokenizer, Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 ``encoder.py``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json(path: Path) -> None:
    """A ``tokenizers`` file whose ids are the UTF-8 bytes of the text (module docstring)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def write_tokenizer_files(
    tokenizer: Tokenizer, tokenizer_path: str | None, max_len: int, out: Path
) -> list[str]:
    """Write the tokenizer files of ``tokenizer`` into ``out``; the names written."""
    eos: str | None = None
    if isinstance(tokenizer, HFTokenizer):
        assert tokenizer_path is not None
        from tokenizers import Tokenizer as RustTokenizer

        shutil.copyfile(Path(tokenizer_path).expanduser(), out / "tokenizer.json")
        if tokenizer.eos_id is not None:
            eos = RustTokenizer.from_file(str(out / "tokenizer.json")).id_to_token(tokenizer.eos_id)
    else:
        byte_tokenizer_json(out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "eos_token": eos,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
