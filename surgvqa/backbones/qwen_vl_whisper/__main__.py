"""``python -m surgvqa.backbones.qwen_vl_whisper create ...``: the graft-creation command (see ``.create``)."""

import sys

from surgvqa.backbones.qwen_vl_whisper.create import main

argv = sys.argv[1:]
if argv[:1] == ["create"]:
    argv = argv[1:]
raise SystemExit(main(argv))
