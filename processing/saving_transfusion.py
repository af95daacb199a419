"""`modeling_transfusion.saving_transfusion`, for `processing_transfusion.py`: the hub export copies the real module
flat next to it, where the same `from .saving_transfusion import` finds it."""

from ..saving_transfusion import check_save_directory, save_atomically

__all__ = ["check_save_directory", "save_atomically"]
