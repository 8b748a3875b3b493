"""Hugging Face remote code that ``moe-dist export-hf`` copies next to ``config.json``.

The files here run inside ``transformers`` (``trust_remote_code=True``) without moe_dist
installed: they import only ``torch`` and ``transformers`` (and each other, relatively).
``qwen3_moe_lpr``: ``configuration_qwen3_moe_lpr.py`` + ``modeling_qwen3_moe_lpr.py``.
"""

REMOTE_CODE_FILES = {
    "qwen3_moe_lpr": ("configuration_qwen3_moe_lpr.py", "modeling_qwen3_moe_lpr.py"),
}
