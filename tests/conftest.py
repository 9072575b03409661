"""Tiny random-weight models and a tiny tokenizer, built in-process from configs: no downloads."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "We propose a method that skips transformer layers at a fixed speedup.",
    "The results show that quality is kept when the model is fine-tuned with skipping in place.",
    "Summarize the abstract in one sentence. Translate the verse into Spanish.",
] * 4
SPECIALS = ["<pad>", "<s>", "</s>"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_llama(tokenizer, num_layers: int = 8, max_positions: int = 256, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # a wide init makes logits peaked, so greedy choices are not near-ties that summation order flips
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def llama(tokenizer):
    return build_llama(tokenizer)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    texts = [
        "In the beginning God created",
        "We propose a method that skips transformer layers at a",
        "Translate the verse",
        "And the earth was without form, and void; and darkness",
    ]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny Llama saved as an HF folder, as a user's local model would be."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
