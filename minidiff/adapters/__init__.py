"""Adapters on a loaded model: LoRA (low-rank weight updates) and textual inversion (new token embeddings).

``lora.py`` is the runtime (the LoRA layer, fuse/unfuse, adapter weights), ``lora_formats.py`` reads and writes the
file layouts (diffusers/peft, kohya/A1111, attention processors), ``lora_loader.py`` is the pipeline API
(``load_lora_weights`` ...), ``textual_inversion.py`` loads embeddings into the tokenizer and text encoder.
"""
