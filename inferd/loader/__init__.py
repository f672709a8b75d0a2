"""Model loading: GGUF and Hugging Face safetensors files, tokenizers, chat templates, the catalogue."""
