"""tome-deploy: Token Merging for timm Vision Transformers as fixed-shape ONNX / TensorRT models."""

__version__ = "0.1.0"
