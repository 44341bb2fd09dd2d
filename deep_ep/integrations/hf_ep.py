"""deep_ep as a transformers expert-parallel implementation (``DistributedConfig(ep_implementation='deep_ep')``).

Newer transformers (the ``transformers.distributed.expert_parallel`` module,
5.21 and later) shard experts themselves when a model is loaded with
``from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=R,
ep_size=R, ep_implementation=...))`` and let the token exchange be
plugged in through ``EPImplementationInterface``. After
:func:`register_ep_implementation`, ``ep_implementation='deep_ep'`` moves the
tokens with :class:`deep_ep.Buffer` instead of transformers' own all-to-all::

    from deep_ep.integrations.hf_ep import register_ep_implementation
    register_ep_implementation()
    cfg = DistributedConfig(fsdp_size=2, ep_size=2, ep_implementation="deep_ep")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=cfg)

For a model already loaded (any transformers 5.x), use
:func:`deep_ep.integrations.patch_moe_model` instead.
"""

from __future__ import annotations

from typing import Any, Optional

from .hf import _get_buffer, deep_ep_experts

__all__ = ["register_ep_implementation"]


def register_ep_implementation(
    name: str = "deep_ep",
    *,
    backend: str = "auto",
    ep_buffer_size: Optional[int] = None,
    compression_level: Any = 16,
    topology_aware: bool = True,
) -> type:
    """Register deep_ep under ``name`` in transformers' ``EPImplementationInterface``; returns the class.

    The keyword arguments configure the :class:`deep_ep.Buffer` (one per
    expert-parallel group, shared by all layers). Raises ``ImportError`` when
    the installed transformers has no expert-parallel registry.
    """
    try:
        from transformers.distributed.expert_parallel import EPImplementation, EPImplementationInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError(
            "this transformers has no expert-parallel registry "
            "(transformers.distributed.expert_parallel, 5.21 and later); use "
            "deep_ep.integrations.patch_moe_model on the loaded model instead"
        ) from e

    class DeepEPImplementation(EPImplementation):
        """Tokens reach the experts through deep_ep dispatch/combine over the EP mesh's group.

        Needs every rank of the expert-parallel group to hold its own batch
        (no tensor parallelism: ``tp_size == 1``).
        """

        def __init__(self, experts, ep_mesh, tp_mesh):
            super().__init__(experts, ep_mesh, tp_mesh)
            if tp_mesh.size() > 1:
                raise NotImplementedError(
                    "ep_implementation='deep_ep' runs without tensor parallelism (tp_size=1); "
                    f"got tp_size={tp_mesh.size()}"
                )
            self.buffer = _get_buffer(ep_mesh.get_group(), backend, ep_buffer_size, compression_level, topology_aware)
            self.num_experts = self.num_local_experts * ep_mesh.size()

        def __call__(self, hidden_states, top_k_index, top_k_weights):
            return deep_ep_experts(
                self.buffer, self.num_experts, self.experts_forward, hidden_states, top_k_index, top_k_weights
            )

    EPImplementationInterface.register(name, DeepEPImplementation)
    return DeepEPImplementation
