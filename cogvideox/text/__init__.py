"""Prompt encoding: the sentencepiece T5 tokenizer and the T5 v1.1 encoder (CogVideoX uses T5-XXL, 226 tokens)."""

from .t5 import T5Encoder, relative_position_buckets
from .tokenizer import T5Tokenizer, TokenizedText

__all__ = ["T5Encoder", "T5Tokenizer", "TokenizedText", "relative_position_buckets"]
