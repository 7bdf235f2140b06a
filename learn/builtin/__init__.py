"""The built-in model's definition: its tasks and corpus, the grader, the tokenizer and the
size presets (trained by ``learn.bootstrap``)."""
