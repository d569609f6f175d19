#!/usr/bin/env python
r"""Merge LoRA adapters (stage 1 → stage 2 → …) into an unquantized (bf16 by default) base; see surgvqa/merge.py.

    python merge_stage2_to_bf16.py --base_model_path BASE --adapter_path STAGE1 [STAGE2 ...] \
        --output_dir MERGED [--dtype bfloat16|float16|float32] [--verify 16] [--full_omni]
"""

from surgvqa.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
