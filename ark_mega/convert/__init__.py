"""Hugging Face checkpoints to and from megatron checkpoints (`tools/convert_checkpoint.py`):
configs (`hf_configs`), weight-name maps (`hf_maps`), folders read and written lazily
(`hf_folder`), tensor-parallel slicing (`sharding`)."""
