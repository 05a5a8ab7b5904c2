"""End-to-end baselines on the stores' splits (`full`, `lora`, `bitfit`, `linear` fine-tuning).

modes.py decides which backbone parameters train (LoRA through HF peft) and writes the fine-tuned
backbone as a timm-format checkpoint that `embedstore ingest --weights CKPT` reads back.
"""
