"""llada-xp: serve, evaluate and convert LLaDA diffusion language models with Fast-dLLM acceleration.

Importing the package registers model_type "llada" with transformers' Auto classes (no remote code needed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from llada_xp.model import LLaDAConfig, LLaDAModelLM

__version__ = "0.1.0"

AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

__all__ = ["LLaDAConfig", "LLaDAModelLM", "__version__"]
