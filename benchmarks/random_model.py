"""Random-weight Llama models saved as Hugging Face model directories, for soaks and tests that need a
model ``kvwire serve`` can load (``KVWIRE_MODEL``) but not a trained one.

Shapes: ``tiny`` (2 layers, 64 wide: starts and calibrates in seconds; tests/faults/test_soak.py) and
``smollm2-135m`` (the layer count, widths, heads and vocabulary of SmolLM2-135M, the bundled model:
KV chunks of the real size, for load runs on machines the bundled GGUF file cannot travel to). The
tokenizer maps one character to one token (ids 1-127) and names every other id ``<i>``, so any token
id of the vocabulary decodes. The weights are random: the KV statistics, and so the chunk sizes, are
close to but not those of the trained model.

Usage: ``python benchmarks/random_model.py DIR [--shape smollm2-135m]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}


def save_random_llama(path: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Save a random-weight Llama of ``shape`` (a key of :data:`SHAPES`) and its tokenizer to ``path``."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = SHAPES[shape]
    vocab_size = int(config["vocab_size"])
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"[UNK]": 0, **{chr(i): i for i in range(1, min(128, vocab_size))}}
    vocab.update({f"<{i}>": i for i in range(128, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    args = parser.parse_args(argv)
    save_random_llama(args.path, args.shape)
    print(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
