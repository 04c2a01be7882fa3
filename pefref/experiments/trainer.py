"""A ``transformers.TrainerCallback`` that runs adapters' training-time behaviour in ``transformers.Trainer``.

Imported on demand (``from pefref.experiments.trainer import TrainingHooksCallback``), never by ``import pefref``.
The callback projects gradients and sets schedules before each optimiser step and projects tensors after it;
the auxiliary loss enters the loss through :func:`with_aux_loss`, which wraps ``Trainer.compute_loss``
(a callback cannot change the loss)::

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TrainingHooksCallback([adapter])])
    with_aux_loss(trainer, [adapter])
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from pefref.runtime.training import after_step_of, aux_loss_of, before_step_of

__all__ = ["TrainingHooksCallback", "with_aux_loss"]


class TrainingHooksCallback(TrainerCallback):
    """Calls ``before_optimizer_step`` and ``after_optimizer_step`` of the given adapters around each optimiser step."""

    def __init__(self, adapters: list[Any]) -> None:
        self.adapters = list(adapters)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        before_step_of(self.adapters, state.global_step)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        after_step_of(self.adapters, state.global_step)


def with_aux_loss(trainer: Any, adapters: list[Any]) -> Any:
    """Wrap ``trainer.compute_loss`` so that the adapters' auxiliary losses are added to the task loss; returns ``trainer``."""
    inner = trainer.compute_loss

    def compute_loss(model: Any, inputs: Any, return_outputs: bool = False, **kw: Any) -> Any:
        out = inner(model, inputs, return_outputs=return_outputs, **kw)
        aux = aux_loss_of(adapters)
        if return_outputs:
            return out[0] + aux, out[1]
        return out + aux

    trainer.compute_loss = compute_loss
    return trainer
