"""The demo world: generated facts and sentences, a word tokenizer, a small model trained on them."""
