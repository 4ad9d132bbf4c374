"""capsnet-hf: CapsNet (Sabour, Frosst & Hinton, 2017) as Hugging Face transformers models.

Importing the package registers the config, both models and the image processor with transformers' Auto classes,
and marks them for export so that `save_pretrained` writes the code and an `auto_map` for `trust_remote_code`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

from .configuration_capsnet import CapsNetConfig
from .image_processing_capsnet import CapsNetImageProcessor
from .kernels.cpu_routing import disable_cpu_routing_kernel, enable_cpu_routing_kernel
from .modeling_capsnet import (
    CapsNetForImageClassification,
    CapsNetImageClassifierOutput,
    CapsNetModel,
    CapsNetModelOutput,
    CapsNetPreTrainedModel,
)
from .paper.baseline_cnn import BaselineCNNConfig, BaselineCNNForImageClassification

AutoConfig.register(CapsNetConfig.model_type, CapsNetConfig, exist_ok=True)
AutoModel.register(CapsNetConfig, CapsNetModel, exist_ok=True)
AutoModelForImageClassification.register(CapsNetConfig, CapsNetForImageClassification, exist_ok=True)
AutoConfig.register(BaselineCNNConfig.model_type, BaselineCNNConfig, exist_ok=True)
AutoModelForImageClassification.register(BaselineCNNConfig, BaselineCNNForImageClassification, exist_ok=True)
AutoImageProcessor.register(CapsNetConfig, image_processor_classes={"pil": CapsNetImageProcessor}, exist_ok=True)
# No video processor: without this entry, pipeline()'s video-processor probe guesses one from the image processor's
# remote-code entry and asks whether to run custom code, although the installed package has everything.
VIDEO_PROCESSOR_MAPPING.register(CapsNetConfig, None, exist_ok=True)

CapsNetConfig.register_for_auto_class()
CapsNetModel.register_for_auto_class("AutoModel")
CapsNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CapsNetImageProcessor.register_for_auto_class("AutoImageProcessor")

__version__ = "0.1.0"

__all__ = [
    "BaselineCNNConfig",
    "BaselineCNNForImageClassification",
    "CapsNetConfig",
    "CapsNetForImageClassification",
    "CapsNetImageClassifierOutput",
    "CapsNetImageProcessor",
    "CapsNetModel",
    "CapsNetModelOutput",
    "CapsNetPreTrainedModel",
    "disable_cpu_routing_kernel",
    "enable_cpu_routing_kernel",
]
