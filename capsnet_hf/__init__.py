"""capsnet-hf: CapsNet (Sabour, Frosst & Hinton, 2017) as Hugging Face transformers models."""

from .configuration_capsnet import CapsNetConfig

__all__ = ["CapsNetConfig"]
