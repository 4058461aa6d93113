"""Export: HF safetensors, GGUF (+ Ollama Modelfile), ONNX, TorchScript, and weight-only
quantisation."""
