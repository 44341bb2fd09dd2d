"""Drop-in integrations (docs/api.md, deep_ep.integrations).

``patch_moe_model`` shards the experts of a Hugging Face MoE model over an
expert-parallel group (:mod:`deep_ep.integrations.hf`). Importing this
package does not import transformers.
"""

from __future__ import annotations

from .hf import EPInfo, UnsupportedMoEError, average_gradients, expert_parameters, patch_moe_model

__all__ = ["patch_moe_model", "average_gradients", "UnsupportedMoEError", "EPInfo", "expert_parameters"]
