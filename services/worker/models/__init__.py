"""Model code over the paged KV cache. One decoder covers the Llama family
(``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``)."""

from services.worker.models.config import ModelConfig, UnsupportedModelError, load_config
from services.worker.models.llama import LlamaModel

__all__ = ["LlamaModel", "ModelConfig", "UnsupportedModelError", "load_config"]
