"""A family's model class that is a transformers class plus code paths of its own (no parameter of its own) reads
and writes the stock class's checkpoints: the same tensor names, the stock class named in ``architectures``."""

from __future__ import annotations


class StockCheckpoint:
    """Mixin, before the transformers class in the bases: ``save_pretrained`` names ``stock_class`` in the saved
    config.json, so any loader that reads ``architectures`` finds the stock class."""

    stock_class: type

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            self.config.architectures = [self.stock_class.__name__]
            self.config.save_pretrained(save_directory)


def register_stock_layout(*classes: type, stock: type) -> None:
    """The stock class's checkpoint key conversions (older layouts, a full model's ``thinker.`` prefix) for
    ``classes`` too: transformers looks them up by class name and skips classes defined outside it."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    mapping = get_checkpoint_conversion_mapping(stock.__name__)
    if mapping is not None:
        for cls in classes:
            register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


__all__ = ["StockCheckpoint", "register_stock_layout"]
