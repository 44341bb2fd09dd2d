"""Drop-in integrations (API.md section 7)."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["patch_moe_model"]


def patch_moe_model(model: Any, num_gpus: Optional[int] = None, use_deep_ep: bool = True, **kwargs: Any) -> Any:
    """Shard a Hugging Face MoE model's experts over an expert-parallel group (API.md 7).

    Not available yet: it arrives with issue 6. Raises ``NotImplementedError``.
    """
    raise NotImplementedError("patch_moe_model arrives with issue 6 (Hugging Face integration)")
