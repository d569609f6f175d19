#!/usr/bin/env python
"""Fine-tune a Qwen video+audio model with LoRA on surgical VQA. Every HF TrainingArguments flag works.

    python train_vqa.py --model_name_or_path MODEL --train_data_path train.jsonl --frames_dir frames \
        --audio_dir audio --output_dir out --bf16 True [...]
    python train_vqa.py config.yaml
"""

from surgvqa.train import main

if __name__ == "__main__":
    raise SystemExit(main())
