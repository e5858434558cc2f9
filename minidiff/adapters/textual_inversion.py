"""Textual inversion (placeholder being written for issue 12)."""


class TextualInversionLoaderMixin:
    def maybe_convert_prompt(self, prompt, tokenizer):
        return prompt
