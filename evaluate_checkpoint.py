#!/usr/bin/env python
"""Evaluate a checkpoint by its generated answers (or re-score a predictions file with --score_predictions).

    python evaluate_checkpoint.py --checkpoint_path OUT --eval_data_path test.jsonl --frames_dir frames \
        --audio_dir audio --output_file preds.jsonl
"""

from surgvqa.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
