"""Export of trained runs to other tools' formats.

Hugging Face ``transformers`` (``moe-dist export-hf``), one idea per file:

- ``hf_support.py``: which target (Mixtral or Qwen3-MoE) expresses a run's model, and the one-line
  refusal (``ExportError``) naming what a target cannot express and why;
- ``hf_config.py``: the target's ``config.json``;
- ``hf_weights.py``: our parameters under the target's names and layouts (``model.safetensors``);
- ``hf_tokenizer.py``: the run's tokenizer as ``tokenizer.json`` + ``tokenizer_config.json``;
- ``hf_export.py``: the whole export, written into a temporary directory beside the output and
  renamed into place, so a failed export leaves nothing at the output path.
"""
